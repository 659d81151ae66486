"""Ansible's linear strategy, run through Mitogen when it is installed (the `fleet` extra installs it).

Why: every task of a plain play starts a Python on the device and compiles ansible-core's module code again
(AnsiballZ ships it as a zip, which Python cannot cache); ansible-core 2.19's grew to several seconds of CPU per
task on a slow board (measured: 3.4 s of CPU for a bare `ping` on an emulated device). Mitogen keeps one
interpreter per device for the whole play and imports that code once. Without Mitogen this is the plain linear
strategy, so a control machine that lacks it still runs every play, only slower."""

from __future__ import annotations

DOCUMENTATION = """
name: mitogen_or_linear
short_description: the linear strategy, through Mitogen when it is installed
description:
  - Task by task on every host of the batch, as ansible.builtin.linear; with Mitogen for Ansible installed on the
    control machine, one Python interpreter is kept on each device for the whole play.
author: appliance maintainers
"""

try:
    import ansible_mitogen.loaders
    import ansible_mitogen.strategy
except ImportError:
    from ansible.plugins.strategy.linear import StrategyModule  # noqa: F401 (what ansible loads from here)
else:
    _Linear = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)

    class StrategyModule(ansible_mitogen.strategy.StrategyMixin, _Linear):  # type: ignore[no-redef]
        pass
