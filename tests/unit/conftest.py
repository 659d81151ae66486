"""Fixtures of the unit tier: a scheduler rig over the fake engine (tests/support/rig.py)."""

from __future__ import annotations

import pytest

from tests.support.rig import Rig


@pytest.fixture
def rig(tmp_path):
    """``rig({model id: fake settings}, process=False, worker={...}, ...)``: a started Rig, closed after the test."""
    made: list[Rig] = []

    def factory(fakes=None, *, start: bool = True, **kwargs) -> Rig:
        instance = Rig(tmp_path, fakes, **kwargs)
        made.append(instance)
        return instance.start() if start else instance

    yield factory
    for instance in made:
        instance.close()
