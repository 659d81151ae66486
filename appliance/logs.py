"""Logging set-up. Request text never goes to the log unless ``logging.log_prompts`` is on (then at debug level)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TextIO

from appliance.config import LoggingConfig


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(config: LoggingConfig, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        # journald stamps every line itself
        stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
        handler.setFormatter(logging.Formatter(stamp + "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level = getattr(logging, config.level.upper())
    root.setLevel(level)
    logging.getLogger("appliance").setLevel(level)
    # third-party chatter stays at warning unless we debug
    for name in ("paho", "waitress", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else max(level, logging.WARNING))
