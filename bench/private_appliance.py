"""A running appliance on a private mosquitto, for the tools that put traffic through one (fuzz, soak)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.transports.broker import Mosquitto, free_port
from tests.support.harness import Appliance, new_appliance


@contextmanager
def private_appliance(default: str, worker: dict, catalog: Callable[[Path], Path] | None = None, *,
                      start_timeout: float = 180) -> Iterator[tuple[Mosquitto, Appliance]]:
    """Start mosquitto and `appliance serve` in a temporary directory; both are stopped on the way out.
    ``catalog(workdir)`` writes the catalog to serve; None serves the built-in one (the embedded default model),
    as `make run` does. The service logs warnings and errors only; its log stays readable until the end."""
    with tempfile.TemporaryDirectory(prefix="appliance-bench-") as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir / "broker", free_port(), persistence=False)
        broker.start()
        catalog_path = catalog(workdir) if catalog is not None else workdir / "no-catalog.toml"
        app = new_appliance(workdir, broker.port, catalog_path, default,
                            {"worker": worker, "logging": {"level": "warning"}})
        if catalog is None:
            app.config["models"].pop("catalog")
        try:
            app.start(timeout=start_timeout)
            yield broker, app
        finally:
            app.stop()
            broker.stop()
