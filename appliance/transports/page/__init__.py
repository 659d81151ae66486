"""The operator page: one server-rendered HTML page on the HTTP port, for a person with a phone or a laptop.

``GET /`` shows the state, the last hour of temperature and throttling, memory, the queue, the models with their
licences and digests, the last errors by code, the release and the one before it, and a chat box that streams from
``/v1/chat/completions``. ``GET /ui/panel`` is the same status part alone (the page refreshes it every 15 s). No CDN,
no inline script (a strict Content-Security-Policy), a few kilobytes in all. The page shows no request text and no
secret: errors are kept as codes, the chat lives only in the browser.

Access follows the API's rule (transports/http.py): with ``http.api_key_file`` set, the page needs the key too. A
browser sends it as HTTP Basic credentials (any user name, the key as password), which it then repeats for the chat.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, render_template

from appliance import __version__
from appliance.catalog import Catalog
from appliance.config import Config
from appliance.errors import ERROR_CODES
from appliance.history import Bucket, History
from appliance.release.install import Layout, current_release
from appliance.status import SERVING, StatusBoard

PAGE_ROUTES = ("/", "/ui/panel")
STATIC_PREFIX = "/ui/static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
CHART_WIDTH, CHART_HEIGHT = 360, 80


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return ""
    seconds = max(0, int(now - ts))
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 5400:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def temperature_chart(buckets: list[Bucket], now: float, window: float, bucket_seconds: float) -> dict[str, Any]:
    """SVG coordinates of the temperature line and of the throttled stretches, on a fixed time axis."""
    values = [b.temperature_c for b in buckets if b.temperature_c is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    low, high = min(low, 30.0), max(high, low + 10.0)

    def x(ts: float) -> float:
        return round((ts - (now - window)) / window * CHART_WIDTH, 1)

    def y(celsius: float) -> float:
        return round(CHART_HEIGHT - (celsius - low) / (high - low) * CHART_HEIGHT, 1)

    points = " ".join(f"{x(b.start)},{y(b.temperature_c)}" for b in buckets if b.temperature_c is not None)
    width = max(1.0, round(CHART_WIDTH * bucket_seconds / window, 1))
    throttled = [{"x": x(b.start), "width": width, "flags": ", ".join(sorted(b.flags))} for b in buckets if b.flags]
    return {"points": points, "throttled": throttled, "low": round(low), "high": round(high),
            "width": CHART_WIDTH, "height": CHART_HEIGHT}


def register(app: Flask, *, config: Config, catalog: Catalog, status: StatusBoard, history: History,
             telemetry: Callable[[], dict[str, Any]], outstanding: Callable[[], int]) -> None:
    here = Path(__file__).parent
    page = Blueprint("page", __name__, template_folder=str(here / "templates"), static_folder=str(here / "static"),
                     static_url_path=STATIC_PREFIX)
    layout = Layout(prefix=config.device.release_dir)

    def context() -> dict[str, Any]:
        now = time.time()
        current = status.current
        reading = telemetry() or {}
        buckets = history.buckets()
        errors = [{"code": row.code, "count": row.count, "meaning": ERROR_CODES.get(row.code, ""),
                   "ago": _ago(row.last.ts if row.last else None, now),
                   "transport": row.last.transport if row.last else "", "param": row.last.param if row.last else ""}
                  for row in history.errors_by_code()]
        models = [{"id": e.id, "family": e.family, "backend": e.backend, "licence": e.licence,
                   "commercial_use": {None: "unknown", True: "yes", False: "no"}[e.commercial_use],
                   "sha256": e.sha256 or "", "size_mib": round(e.size / 2**20) if e.size else None,
                   "loaded": e.id == current.model and current.state in SERVING,
                   "default": e.id == config.models.default, "text": e.generates_text} for e in catalog]
        chart = temperature_chart(buckets, now, history.window_seconds, history.bucket_seconds)
        return {"device": config.device.id, "version": __version__, "status": current,
                "since": _ago(current.since, now), "reading": reading, "outstanding": outstanding(), "chart": chart,
                "minutes": round((now - buckets[0].start) / 60) if buckets else 0, "errors": errors, "models": models,
                "text_models": [m["id"] for m in models if m["text"]],
                "release": {"current": current_release(layout), "previous": current_release(layout, "previous")},
                "static": STATIC_PREFIX}

    def html(text: str) -> Response:
        return Response(text, mimetype="text/html", headers={
            "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store"})

    @page.get("/")
    def index() -> Response:
        return html(render_template("page.html", **context()))

    @page.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status=204)  # every browser asks; without this each page view counted as a bad_request

    @page.get("/ui/panel")
    def panel() -> Response:
        return html(render_template("panel.html", **context()))

    app.register_blueprint(page)
