"""The `appliance` command: serve, ask, status, models, config, firstboot (commands.py); `appliance models ...`
(models.py); the small client behind `ask` and `status` (client.py)."""

from appliance.cli.commands import main

__all__ = ["main"]
