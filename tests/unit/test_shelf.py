"""The model shelf: its recommendations fit their boards, its computed sizes match a real file, and docs/models.md
shows what the code says."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from appliance.backends.probe import MiB
from appliance.catalog import default_model, shelf, shelf_report
from appliance.config import load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


@pytest.fixture
def config():
    return load_config(None, env={})


@pytest.mark.parametrize("board", shelf.BOARDS, ids=lambda b: b.id)
def test_every_recommendation_loads_on_its_board_under_the_default_config(board, config):
    english = shelf.fit(shelf.get_model(board.english), board.available_mib * MiB, config)
    multilingual = shelf.fit(shelf.get_model(board.multilingual), board.available_mib * MiB, config)
    assert english.verdict == "fits", english.why
    assert multilingual.verdict in ("fits", "tight"), multilingual.why
    assert english.model.commercial_use and multilingual.model.commercial_use  # no licence surprise on a shelf pick
    assert "en" in english.model.languages and "es" in multilingual.model.languages and \
        "zh" in multilingual.model.languages


def test_the_shelf_entry_of_the_default_model_is_the_default_model():
    entry = shelf.get_model(default_model.MODEL_ID)
    assert entry.file_size == default_model.SIZE and entry.licence == default_model.LICENCE


def test_computed_sizes_match_a_real_file():
    """Without its known size, the default model's Q4_1 file computed the shelf's way (body at Q4_0 + half a bit for
    Q4_1's offsets, output matrix at Q8_0) lands within 5% of the real 98,362,432 bytes."""
    entry = replace(shelf.get_model(default_model.MODEL_ID), file_size=None)
    q4_1 = entry.weights + (entry.params - entry.arch.n_vocab * entry.arch.n_embd) * 0.5 / 8
    assert abs(q4_1 - default_model.SIZE) / default_model.SIZE < 0.05, q4_1


def test_verdicts_name_what_was_needed_and_what_was_free(config):
    model = shelf.get_model("qwen2.5-0.5b-instruct")
    needed = shelf.fit(model, 1 << 40, config).footprint.total
    too_big = shelf.fit(model, needed - MiB, config)
    tight = shelf.fit(model, needed + MiB, config)
    roomy = shelf.fit(model, needed + (config.memory.low_mib + 1) * MiB, config)
    assert (too_big.verdict, tight.verdict, roomy.verdict) == ("too big", "tight", "fits")
    assert too_big.why == f"needs about {needed / MiB:.0f} MiB, 1 MiB more than the {(needed - MiB) / MiB:.0f} free"
    assert "under memory.low_mib (256)" in tight.why
    noncommercial = shelf.fit(shelf.get_model("qwen2.5-3b-instruct"), 1 << 40, config)
    assert noncommercial.why.endswith("refused until models.allow_noncommercial = true (its licence is "
                                      "non-commercial)")


def test_docs_show_the_shelf_the_code_computes(config):
    """docs/models.md holds `appliance models shelf --markdown` verbatim; regenerate it when the shelf changes."""
    assert shelf_report.markdown(config) in DOC.read_text()
