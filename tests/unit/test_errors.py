"""The error codes are part of the protocol: every one a requester can receive is documented where people look."""

from __future__ import annotations

import re
from pathlib import Path

from appliance.errors import ERROR_CODES, error_from_code

DOCS = Path(__file__).resolve().parents[2]


def test_protocol_reference_tabulates_every_code():
    table = re.findall(r"^\| `([a-z_]+)` \| \d{3}", (DOCS / "docs" / "protocol.md").read_text(), re.M)
    assert sorted(table) == sorted(ERROR_CODES)


def test_readme_lists_every_code():
    readme = (DOCS / "README.md").read_text()
    listed = re.search(r"Codes: (.*?);", readme, re.S).group(1)
    assert sorted(re.findall(r"`([a-z_]+)`", listed)) == sorted(ERROR_CODES)


def test_codes_survive_a_process_boundary():
    for code in ERROR_CODES:
        assert error_from_code(code, "m", "p").code == code
