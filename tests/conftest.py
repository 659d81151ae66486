"""Shared fixtures: a real mosquitto on a free loopback port, tiny real GGUF models, the appliance as a process."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

from appliance.catalog import default_model
from appliance.transports.broker import Mosquitto, free_port, mosquitto_binary
from tests.support import tiny_models
from tests.support.harness import DEFAULT_MODEL_WORKER, MqttClient, new_appliance


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """tiny (Q4_0, fast), tiny-f32, tiny-chat (embeds a Jinja chat template), slow (16 MB, ~400 tok/s here,
    4096 context: keeps the worker busy long enough to queue behind it), corrupt (wrong sha256)."""
    d = tmp_path_factory.mktemp("models")
    f32 = tiny_models.write_llama(d / "tiny-f32.gguf")
    q4 = tiny_models.quantize(f32, d / "tiny-q4_0.gguf", "q4_0")
    chat = tiny_models.write_llama(d / "tiny-chat.gguf", seed=1, chat_template=tiny_models.CHAT_TEMPLATE)
    slow = tiny_models.write_llama(d / "slow.gguf", n_embd=256, n_layer=4, n_ff=1024, n_head=8, n_head_kv=4,
                                   context=4096, seed=2)
    entry = tiny_models.catalog_entry
    catalog = "\n".join([entry("tiny", q4, template="chatml"), entry("tiny-f32", f32, template="alpaca"),
                         entry("tiny-chat", chat), entry("slow", slow, template="chatml"),
                         entry("corrupt", q4, sha256="0" * 64, template="chatml")])
    (d / "catalog.toml").write_text(catalog)
    return d


@pytest.fixture(scope="session")
def catalog_path(models_dir) -> Path:
    return models_dir / "catalog.toml"


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is required for the integration tests (apt install mosquitto); .ci/run installs it")
    data = tmp_path_factory.mktemp("broker")
    os.chmod(data, 0o777)
    instance = Mosquitto(data, free_port(), persistence=False)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def appliance_factory(tmp_path, broker, catalog_path):
    """Start appliances: ``factory(default="tiny", overrides={...}, mqtt=True)``; all are stopped afterwards."""
    started = []

    def factory(default: str = "tiny", overrides: dict | None = None, *, mqtt: bool = True, start: bool = True,
                env: dict | None = None):
        instance = new_appliance(tmp_path, broker.port if mqtt else None, catalog_path, default, overrides, env)
        started.append(instance)
        return instance.start() if start else instance

    yield factory
    for instance in started:
        instance.kill()
    for instance in started:
        _assert_no_swallowed_errors(instance)


#: log lines that mean an exception was caught and logged somewhere it should never happen
SWALLOWED = ("callback failed", "scheduler error", "reply sink failed", "status listener failed",
             "HTTP handler failed", "error listener failed", "Traceback")


def _assert_no_swallowed_errors(instance) -> None:
    """Home Assistant's trick: a test fails when the service logged an exception it caught (a guarded MQTT
    callback, the scheduler loop, a sink), even if the test's own checks passed."""
    bad = [line for line in instance.log_text().splitlines() if any(s in line for s in SWALLOWED)]
    assert not bad, f"{instance.device} logged caught exceptions:\n" + "\n".join(bad[:20])


@pytest.fixture(scope="module")
def default_app(tmp_path_factory, broker):
    """The appliance as `make run` serves it: no catalog file, so the built-in catalog copies the real default model
    (SmolLM2-135M-Instruct, installed by requirements/default-model.txt) into its state dir."""
    try:
        importlib.metadata.distribution(default_model.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the default model is not installed ({default_model.INSTALL_HINT})")
    workdir = tmp_path_factory.mktemp("default-model")
    app = new_appliance(workdir, broker.port, workdir / "no-catalog.toml", default_model.MODEL_ID,
                        {"worker": DEFAULT_MODEL_WORKER})
    app.config["models"].pop("catalog")
    app.start(timeout=180)
    yield app
    app.stop()
    _assert_no_swallowed_errors(app)


@pytest.fixture
def appliance(appliance_factory):
    return appliance_factory()


@pytest.fixture
def mqtt_client(broker):
    clients = []

    def factory(protocol: str = "5") -> MqttClient:
        c = MqttClient(broker.host, broker.port, protocol=protocol)
        clients.append(c)
        return c

    yield factory
    for c in clients:
        c.close()


@pytest.fixture
def shipped_broker(tmp_path):
    """Start mosquittos with the shipped config and ACL: ``factory(users, name="broker", tls=None)``, each with the
    given accounts (name -> password); all are stopped afterwards."""
    from tests.support.shipped_broker import ShippedBroker
    started: list[ShippedBroker] = []

    def factory(users: dict[str, str], name: str = "broker", tls: tuple[Path, Path] | None = None) -> ShippedBroker:
        broker = ShippedBroker(tmp_path / name, users, tls=tls)
        broker.start()
        started.append(broker)
        return broker

    yield factory
    for broker in started:
        broker.stop()
