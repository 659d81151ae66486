"""The fleet plays' strategy (ansible/plugins/strategy/mitogen_or_linear.py): through Mitogen where the control
machine has it (the `fleet` extra installs it, and the fleet test's play times depend on it), plain linear where
it does not, so a play never fails for want of it."""

from __future__ import annotations

import configparser
import importlib.util
import sys

import pytest

from tests.support.harness import REPO

ANSIBLE = REPO / "ansible"
pytest.importorskip("ansible", reason="the fleet extra is not installed")


def load_strategy():
    spec = importlib.util.spec_from_file_location("fleet_strategy", ANSIBLE / "plugins/strategy/mitogen_or_linear.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StrategyModule


def test_the_plays_use_it():
    config = configparser.ConfigParser()
    config.read(ANSIBLE / "ansible.cfg")
    assert config["defaults"]["strategy"] == "mitogen_or_linear"
    assert (ANSIBLE / config["defaults"]["strategy_plugins"] / "mitogen_or_linear.py").is_file()


def test_it_runs_through_mitogen_when_installed():
    import ansible.plugins.strategy.linear as linear
    import ansible_mitogen.strategy  # the fleet extra installs it

    strategy = load_strategy()
    assert issubclass(strategy, ansible_mitogen.strategy.StrategyMixin)
    assert issubclass(strategy, linear.StrategyModule)


def test_it_is_plain_linear_without_mitogen(monkeypatch):
    import ansible.plugins.strategy.linear as linear

    for name in [n for n in sys.modules if n == "ansible_mitogen" or n.startswith("ansible_mitogen.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ansible_mitogen", None)  # import fails as if it were not installed
    assert load_strategy() is linear.StrategyModule
