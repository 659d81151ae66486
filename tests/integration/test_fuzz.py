"""A short, seeded fuzz campaign (issue 10): a few hundred generated payloads over MQTT (v5 and 3.1.1; generate,
infer and embed) and HTTP (every route) to a running appliance on the real mosquitto. `make fuzz` runs the full
10,000 and writes docs/reliability.md; this is the same campaign, small enough for CI. The seed is fixed so that a
failure here can be reproduced (`python -m bench.fuzz --payloads 400 --seed 2026`)."""

from __future__ import annotations

import pytest

from tests.support.fuzz_campaign import Campaign, write_catalog

PAYLOADS, SEED = 400, 2026


@pytest.fixture
def fuzz_catalog(tmp_path):
    return write_catalog(tmp_path)


def test_generated_payloads_are_all_answered_and_none_is_internal(appliance_factory, broker, fuzz_catalog):
    app = appliance_factory("tiny", {"models": {"catalog": str(fuzz_catalog)}, "worker": {"max_queue": 16}})
    campaign = Campaign(app, broker.host, broker.port)
    try:
        tally = campaign.run(PAYLOADS, SEED)
    finally:
        campaign.close()
    assert tally.failures() == [], "\n".join(tally.failures()[:20])
    assert tally.total == PAYLOADS
    # the campaign reached every door and got more than refusals back: it exercised the service, not only its parser
    assert {"mqtt5", "mqtt311", "mqtt5-infer", "mqtt5-embed", "http"} <= set(tally.sent), tally.sent
    assert tally.outcomes["ok"] > 0 and tally.outcomes["bad_request"] > 0, tally.outcomes
    assert tally.outcomes["http 200"] > 0 and tally.outcomes["http 400"] > 0, tally.outcomes
