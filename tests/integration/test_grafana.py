"""The Grafana dashboard (docs/grafana/appliance-fleet.json) against a running appliance: every metric and label it
queries is on the appliance's live /metrics, and a real Prometheus (Debian's) scraping that appliance answers every
panel's query with data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.transports.broker import free_port
from tests.support.harness import REPO, FakeBoard, http_get, http_post

DASHBOARD = REPO / "docs" / "grafana" / "appliance-fleet.json"
#: series Prometheus itself makes for every target (not on /metrics), and the labels it adds to every series
PROMETHEUS_SERIES, PROMETHEUS_LABELS = {"up"}, {"instance", "job"}
#: Grafana's variables, as Grafana would substitute them with one device selected over a short range
VARIABLES = {"$__rate_interval": "30s", "$__range": "10m", "$instance": ".*", "$job": "appliance"}
PROMQL_WORDS = {"sum", "by", "rate", "increase", "max", "count", "or", "vector", "histogram_quantile", "le"}


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def used(expr: str) -> dict[str, set[str]]:
    """Metric name -> label names an expression uses (in matchers and in `by (...)`)."""
    out: dict[str, set[str]] = {}
    for name, matchers in re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?:\{([^}]*)\})?", expr):
        if name in PROMQL_WORDS or not (name.startswith("appliance_") or name in PROMETHEUS_SERIES):
            continue
        out.setdefault(name, set()).update(re.findall(r"([a-z_]+)\s*[=!~]", matchers))
    grouping = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
    for labels in out.values():
        labels.update(grouping - {"le"})
    return out


def exposed(metrics_text: str) -> dict[str, set[str]]:
    """Sample name -> label names, as on /metrics."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture
def busy_appliance(appliance_factory, tmp_path):
    """An appliance with a board (temperature, throttle flags), one generation done and one error replied."""
    board = FakeBoard(tmp_path / "board")
    board.set_throttled(0x1)
    app = appliance_factory(overrides=board.overrides(), env=board.env(), mqtt=False)
    assert http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 4})[0] == 200
    assert http_post(app.http_url + "/v1/completions", {"model": "nope", "prompt": "a"})[0] == 404
    app.wait_status(lambda s: s["telemetry"].get("throttle"))
    return app


def test_every_metric_the_dashboard_queries_is_on_metrics(busy_appliance):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["targets"], panel["title"]
        assert all(t["refId"] and t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    live = exposed(http_get(busy_appliance.http_url + "/metrics")[1].decode())
    wanted: dict[str, set[str]] = {}
    for expr in queries():
        for name, labels in used(expr).items():
            wanted.setdefault(name, set()).update(labels)
    assert {"appliance_state", "appliance_tokens_per_second", "appliance_cpu_temperature_celsius",
            "appliance_throttle", "appliance_errors_total"} <= set(wanted), "the fleet panels the issue asks for"
    for name, labels in wanted.items():
        if name in PROMETHEUS_SERIES:
            continue
        assert name in live, f"{name} is not on /metrics"
        assert labels - PROMETHEUS_LABELS <= live[name], f"{name}: labels {labels - live[name]} not on /metrics"


def test_prometheus_answers_every_panel(busy_appliance, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Prometheus is required (apt install prometheus); .ci/run installs it")
    port = free_port()
    target = urllib.parse.urlsplit(busy_appliance.http_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: appliance\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}/api/v1/query?query="

        def query(expr: str) -> list:
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            status, body = http_get(base + urllib.parse.quote(expr))
            answer = json.loads(body) if status in (200, 400, 422) else {"status": status}
            assert answer.get("status") == "success", (expr, answer)
            return answer["data"]["result"]

        deadline = time.monotonic() + 90
        while True:  # enough scrapes for rate() over the window
            try:
                scraped = query("count_over_time(appliance_state[1m])")
            except (OSError, AssertionError):
                scraped = []
            if scraped and float(scraped[0]["value"][1]) >= 12:
                break
            assert time.monotonic() < deadline, Path(tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        http_post(busy_appliance.http_url + "/v1/completions", {"model": "nope", "prompt": "a"})  # an error in range
        time.sleep(3)
        for expr in queries():
            assert query(expr), f"no data for {expr}"
        assert float(query('sum(appliance_state{state=~"ready|busy"})')[0]["value"][1]) == 1.0
    finally:
        proc.terminate()
        proc.wait(10)
