"""The appliance's configuration: one TOML file, overridable key by key from the environment.

Any key can be overridden by ``APPLIANCE_<SECTION>_<KEY>`` (``APPLIANCE_MQTT_PORT=1884``), which is how systemd
drop-ins and the tests set single values.
"""

from appliance.config.loader import load_config, read_secret
from appliance.config.reference import reference_markdown
from appliance.config.schema import (
                                     SECTIONS,
                                     Config,
                                     DeviceConfig,
                                     HttpConfig,
                                     LoggingConfig,
                                     ModelsConfig,
                                     MqttConfig,
                                     WorkerConfig,
)
from appliance.errors import ConfigError

__all__ = ["SECTIONS", "Config", "ConfigError", "DeviceConfig", "HttpConfig", "LoggingConfig", "ModelsConfig",
           "MqttConfig", "WorkerConfig", "load_config", "read_secret", "reference_markdown"]
