"""Health, readiness and metrics stay quick while many long requests wait (issue 10.4): a waiting request holds a
waitress thread, so the HTTP transport keeps some threads for probes and refuses requests beyond its seats with
`busy` at once."""

from __future__ import annotations

import json
import socket
import threading
import time

from tests.support.harness import http_get, http_post

LONG = {"prompt": "a", "max_tokens": 3000, "temperature": 0}


class OpenRequest:
    """A POST on its own socket, read in the background until closed: the test decides when the client leaves."""

    def __init__(self, port: int, path: str, body: dict) -> None:
        data = json.dumps(body).encode()
        self.sent = time.monotonic()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        self.received = b""
        self.first_byte: float | None = None
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if self.first_byte is None:
                self.first_byte = time.monotonic()
            self.received += data

    @property
    def body(self) -> bytes | None:
        """The response body once all of it has come (its Content-Length), else None: the status line and the
        body may arrive in separate reads."""
        head, sep, body = self.received.partition(b"\r\n\r\n")
        lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")]
        if not sep or not lengths or len(body) < int(lengths[0]):
            return None
        return body

    @property
    def status(self) -> int | None:
        line = self.received.split(b"\r\n", 1)[0]
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else None

    def close(self) -> None:
        self._stop.set()
        self._reader.join(timeout=5)
        self.sock.close()


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[int(0.99 * (len(ordered) - 1))]


def test_probes_stay_quick_and_extra_requests_get_busy_at_once_with_16_long_requests_open(appliance_factory):
    app = appliance_factory("slow", {"worker": {"context_size": 4096, "max_queue": 16}, "http": {"threads": 16}},
                            mqtt=False)
    port = int(app.http_url.rsplit(":", 1)[1])
    requests = [OpenRequest(port, "/v1/completions", {**LONG, "stream": i % 2 == 0}) for i in range(16)]
    try:
        seats = 16 - 4  # http.threads less the four kept for probes
        app.wait_status(lambda s: s["outstanding"] == seats, timeout=60)
        deadline = time.monotonic() + 30
        while sum(r.status == 503 and r.body is not None for r in requests) < 16 - seats \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = [r for r in requests if r.status == 503]
        assert len(refused) == 16 - seats, [r.received[:200] for r in requests]
        for r in refused:
            assert r.body is not None, r.received
            body = json.loads(r.body)
            assert body["error"]["code"] == "busy" and "http.threads" in body["error"]["message"]
        waits = sorted(round(r.first_byte - r.sent, 2) for r in refused if r.first_byte)
        print("busy answered after (s):", waits)
        assert waits[-1] < 10, "the refusals came at once, not after a generation ended"

        latencies: dict[str, list[float]] = {"/healthz": [], "/readyz": [], "/metrics": []}
        for _ in range(50):
            for route, samples in latencies.items():
                started = time.monotonic()
                status, _ = http_get(app.http_url + route, timeout=30)
                samples.append(time.monotonic() - started)
                assert status == 200, route
        p99 = {route: round(_p99(samples) * 1000, 1) for route, samples in latencies.items()}
        print("p99 over 50 probes with 16 long requests open (ms):", p99)
        assert max(p99.values()) < 1000, p99  # a report with a generous bound: without seats they wait minutes
        assert app.status()["outstanding"] == seats, "the long requests were still open during the probes"
    finally:
        for r in requests:
            r.close()
    # the clients left: their requests are cancelled and every seat is given back
    app.wait_status(lambda s: s["outstanding"] == 0, timeout=120)
    results: list[int] = []

    def short_request() -> None:
        results.append(http_post(app.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2}, timeout=120)[0])

    for _ in range(2):
        results.clear()
        threads = [threading.Thread(target=short_request) for _ in range(seats)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * seats
