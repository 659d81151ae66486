"""`appliance serve`: wires the pieces together and owns the order of start-up and shutdown.

Start-up: catalog and default model -> status and metrics -> scheduler (spawns the worker, loads the model in the
background) -> MQTT (a private broker first when none is configured) -> HTTP. Requests are accepted as soon as
the transports are up; they wait in the queue while the model loads.

Shutdown: stop taking MQTT requests (they stay unacked, so the broker keeps them for the next start) -> stop the
scheduler and worker -> stop HTTP -> publish ``offline`` and disconnect -> stop the private broker.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.catalog import Catalog, default_embedder, default_model
from appliance.config import Config, ConfigError, read_secret
from appliance.config.loader import is_loopback
from appliance.errors import ApplianceError
from appliance.generation import moderation
from appliance.generation.scheduler import Scheduler
from appliance.history import History
from appliance.metrics import Metrics
from appliance.status import StatusBoard
from appliance.supervisor.guard import Guard
from appliance.supervisor.indicators import Indicators
from appliance.supervisor.loop import Supervisor
from appliance.supervisor.release_trial import TRIAL_FAILED, RunningRelease, TrialWatch
from appliance.supervisor.sensors import Sensors
from appliance.supervisor.systemd import Notifier
from appliance.tensors.pool import InferencePool
from appliance.transports import page as operator_page
from appliance.transports.broker import BrokerError, Mosquitto, free_port, port_is_free
from appliance.transports.http import HttpServer, create_app
from appliance.transports.mqtt import MqttTransport

if TYPE_CHECKING:
    from appliance.transports.wyoming import WyomingServer

log = logging.getLogger(__name__)


class StartupError(ApplianceError):
    """A transport could not start (port in use, broker unreachable at start-up ...)."""


def load_catalog(config: Config) -> Catalog:
    """The configured catalog file, or the built-in one (the embedded default model) when there is none."""
    if config.catalog_path.is_file():
        catalog = Catalog.load(config.catalog_path)
    else:
        catalog = default_model.builtin_catalog(config.device.state_dir / "models")
        embedder = default_embedder.entry()  # None unless requirements/embedding-model.txt is installed
        if embedder is not None:
            catalog = Catalog([*catalog, embedder], catalog.origin)
    if config.models.default not in catalog:
        raise ConfigError([f"models.default = {config.models.default!r}: not in the catalog {catalog.origin} "
                           f"(available: {', '.join(catalog.ids) or 'none'})"])
    if not catalog.get(config.models.default).generates_text:
        raise ConfigError([f"models.default = {config.models.default!r}: a "
                           f"{catalog.get(config.models.default).backend} model cannot be the default (it does not "
                           f"generate text)"])
    problems = moderation.config_problems(config, catalog)
    if problems:
        raise ConfigError(problems)
    return catalog


class Service:
    def __init__(self, config: Config, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog
        self.release = RunningRelease.detect()
        self.status = StatusBoard(config.device.id, release=self.release.to_status() if self.release else None)
        self.metrics = Metrics()
        self.status.subscribe(self.metrics.on_status)
        self.sensors = Sensors(config.memory, config.thermal, config.gpio)
        self.scheduler = Scheduler(catalog, config, self.status, self.metrics,
                                   Guard(config, self.sensors.memory))
        self.notifier = Notifier()
        self.indicators = Indicators(config.gpio)
        self.infer = InferencePool(catalog, config, self.scheduler.reporter, self.scheduler.guard)
        if config.moderation.model:
            problems = moderation.config_problems(config, catalog)  # again: `serve --model` skips load_catalog
            if problems:
                raise ConfigError(problems)
            self.scheduler.gate = moderation.Moderator(config.moderation, catalog, self.infer).check
        self.trial = None
        if self.release is not None and self.release.trial is not None:
            self.trial = TrialWatch(self.release, lambda: self.scheduler.default_model_failure, self.give_up)
        self.supervisor = Supervisor(config, self.scheduler, self.status, self.metrics, self.sensors, self.notifier,
                                     self.indicators, publish_telemetry=self._publish_telemetry,
                                     extra_health=lambda: self.http is None or self.http.alive,
                                     ready_when=self.trial.may_report_ready if self.trial else None,
                                     warnings=self.release.warnings() if self.release else ())
        if self.trial is not None:
            self.status.subscribe(self.trial.on_status)
        self.history = History()  # the operator page's last hour and last errors
        self.supervisor.reading_listeners.append(self.history.on_reading)
        self.scheduler.reporter.error_listeners.append(self.history.on_error)
        self.broker: Mosquitto | None = None
        self.mqtt: MqttTransport | None = None
        self.http: HttpServer | None = None
        self.wyoming: WyomingServer | None = None
        self.mqtt_address: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._stop_reason = "shut down"
        self.exit_code = 0
        self._closed = False

    def start(self) -> None:
        """Start everything; on any failure, stop what was started and raise."""
        try:
            self._prepare_default_model()
            if self.trial is not None:
                self.trial.start()
            self.supervisor.start()  # first reading before the first request or model load
            self.scheduler.start()
            self.infer.start()
            if self.config.wyoming.enabled:  # listening before /readyz can answer: its "ready" covers Wyoming too
                self._start_wyoming()
            if self.config.http.enabled:
                self._start_http()
            if self.config.mqtt.enabled:
                self._start_mqtt()
        except BaseException:
            self.close()
            raise
        self._announce()

    def _announce(self) -> None:
        """One line that tells a person where to send requests."""
        parts = [f"model {self.config.models.default}"]
        if self.mqtt_address:
            host, port = self.mqtt_address
            prefix = self.config.mqtt.topic_prefix
            parts.append(f"MQTT {host}:{port} topics {prefix}/{self.config.device.id}/generate and "
                         f"{prefix}/fleet/generate")
        else:
            parts.append("no MQTT")
        if self.http is not None:
            parts.append(f"HTTP http://{self.http.host}:{self.http.port}/v1 (operator page /)")
        if self.wyoming is not None:
            parts.append(f"Wyoming tcp://{self.wyoming.host}:{self.wyoming.port}")
        log.info("serving %s", "; ".join(parts))

    def _start_http(self) -> None:
        h, w = self.config.http, self.config.worker
        api_key = read_secret(h.api_key_file) if h.api_key_file else None
        page = functools.partial(operator_page.register, config=self.config, catalog=self.catalog,
                                 status=self.status, history=self.history, telemetry=lambda: self.supervisor.telemetry,
                                 outstanding=lambda: self.scheduler.outstanding)
        app = create_app(self.scheduler, self.status, self.metrics, api_key, max_body=self.config.mqtt.max_payload,
                         result_wait=w.request_timeout + w.cancel_grace + 30,
                         telemetry=lambda: self.supervisor.telemetry, infer=self.infer, page=page,
                         threads=h.threads)
        try:
            self.http = HttpServer(app, h.bind, h.port, h.threads)
        except OSError as exc:
            raise StartupError(f"HTTP: cannot listen on {h.bind}:{h.port}: {exc.strerror} "
                               f"(set http.port or APPLIANCE_HTTP_PORT)") from None
        self.http.start()
        if api_key is None and not is_loopback(h.bind):
            log.warning("HTTP: serving %s:%d without an API key (http.allow_anonymous = true): anyone who can reach "
                        "it can use the models and read the status", h.bind, self.http.port)

    def _start_wyoming(self) -> None:
        w = self.config.wyoming
        if w.model and (w.model not in self.catalog or not self.catalog.get(w.model).generates_text):
            raise ConfigError([f"wyoming.model = {w.model!r}: not a text model of the catalog {self.catalog.origin}"])
        from appliance.transports.wyoming import WyomingServer  # imported only when it is used
        self.wyoming = WyomingServer(self.config, self.scheduler)
        try:
            self.wyoming.start()
        except OSError as exc:
            self.wyoming = None
            raise StartupError(f"Wyoming: cannot listen on {w.bind}:{w.port}: {exc.strerror} "
                               f"(set wyoming.port or APPLIANCE_WYOMING_PORT)") from None

    def _prepare_default_model(self) -> None:
        entry = self.catalog.get(self.config.models.default)
        if self.catalog.origin == "built-in" and not entry.path.is_file():
            try:
                default_model.ensure(entry.path.parent)
            except ApplianceError as exc:
                log.error("%s", exc.message)  # the load will fail with the same reason and the status says so

    def _start_mqtt(self) -> None:
        m = self.config.mqtt
        host, port = m.host, m.port
        if not host:
            if not m.private_broker:
                log.warning("MQTT: no broker configured (mqtt.host is empty) and mqtt.private_broker is false; "
                            "serving HTTP only")
                return
            if not port_is_free("127.0.0.1", port):
                port = free_port()
                log.info("MQTT: port %d is taken; the private broker uses %d", m.port, port)
            self.broker = Mosquitto(self.config.device.state_dir / "broker", port)
            try:
                self.broker.start()
            except BrokerError as exc:
                log.warning("MQTT: could not start a private broker (%s); serving HTTP only", exc)
                self.broker = None
                return
            host = "127.0.0.1"
        self.mqtt_address = (host, port)
        self.mqtt = MqttTransport(self.config, self.scheduler, self.status, self.metrics, self.infer,
                                  telemetry=lambda: self.supervisor.telemetry)
        self.mqtt.start(host, port)

    def _publish_telemetry(self, payload: dict[str, Any]) -> None:
        if self.mqtt is not None:
            self.mqtt.publish_telemetry(payload)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def give_up(self, reason: str) -> None:
        """Stop and exit with :data:`TRIAL_FAILED`: this start of a release on trial did not serve."""
        self._stop_reason = reason
        self.exit_code = TRIAL_FAILED
        self._stop.set()

    def run_until_stopped(self) -> None:
        """Block until SIGTERM or SIGINT (systemd stop, Ctrl-C), then shut down."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        log.info("shutting down")
        self.notifier.stopping()
        if self.trial is not None:
            self.trial.close()
        self.supervisor.close()
        if self.wyoming is not None:
            self.wyoming.close()
        if self.mqtt is not None:
            self.mqtt.stop_accepting()
        self.scheduler.close()
        self.infer.close()
        if self.http is not None:
            self.http.close()
        self.status.set("offline", reason=self._stop_reason)
        if self.mqtt is not None:
            self.mqtt.close()
        self.indicators.close()
        if self.broker is not None:
            self.broker.stop()
        log.info("stopped")


def direct_model_config(config: Config, model_file: Path) -> tuple[Config, Catalog]:
    """`serve --model FILE.gguf`: serve one file with no catalog entry, as `llama-server -m` does."""
    catalog = Catalog.single_file(model_file)
    return config.replace("models", default=catalog.ids[0], switch=False, verify=False), catalog
