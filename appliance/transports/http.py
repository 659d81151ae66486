"""HTTP transport: an OpenAI-compatible API plus health, readiness, status and Prometheus metrics (Flask).

Served by waitress, which streams each server-sent event as it is yielded and tells the app when a client has gone
away, so an abandoned stream frees the worker at once.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

from flask import Flask, Response, request
from waitress.server import create_server
from werkzeug.exceptions import HTTPException

from appliance import __version__
from appliance.errors import (
    ApplianceError,
    BadRequest,
    Busy,
    Cancelled,
    Internal,
    Unauthorized,
    UnknownModel,
)
from appliance.generation.scheduler import Job, Scheduler
from appliance.json_input import decode_json
from appliance.messages import Abandoned, Chunk, Done, Failed, JobEvent
from appliance.metrics import Metrics
from appliance.protocol import Completion, GenerateRequest, TensorResult, tensor_result_payload
from appliance.status import SERVING, StatusBoard
from appliance.tensors.pool import Answer, InferencePool
from appliance.transports import embed_routes, ollama, ollama_routes, openai
from appliance.transports.ollama_routes import Events

log = logging.getLogger(__name__)

PUBLIC_ROUTES = ("/healthz", "/favicon.ico")  # the icon route answers 204: nothing to protect
BROWSER_PAGE, BROWSER_PREFIX = "/", "/ui/"  # the operator page: a 401 there asks the browser for the key (Basic)
OLLAMA_PREFIX = "/api/"  # Ollama's routes answer errors in Ollama's shape ({"error": text})
POLL_SECONDS = 0.25  # how often a waiting stream checks whether its client is still there
PROBE_THREADS = 4  # waitress threads a waiting request may never take: health, metrics and refusals stay quick


class Seats:
    """How many requests may wait for a model at once, so that waiting ones cannot hold every waitress thread.

    waitress runs each request on one of a fixed set of threads, and a request waiting for its answer holds its
    thread the whole time. With every thread held, ``/healthz``, ``/readyz``, ``/metrics`` and even the ``busy``
    refusal would queue behind the longest generation (and an Ansible health check would time out and roll a good
    release back). A request that finds no seat gets ``busy`` at once instead.
    """

    def __init__(self, threads: int) -> None:
        self.count = threads - min(PROBE_THREADS, threads // 2)
        self._free = threading.BoundedSemaphore(self.count)

    def take(self) -> Callable[[], None]:
        """A seat, or :class:`Busy`; the returned function gives it back (once, however often it is called)."""
        if not self._free.acquire(blocking=False):
            raise Busy(f"all {self.count} HTTP request seats are taken (http.threads); try again later")
        given_back = threading.Event()

        def give_back() -> None:
            if not given_back.is_set():
                given_back.set()
                self._free.release()
        return give_back


class QueueSink:
    """Hands a job's events from the scheduler thread to the HTTP thread serving the request."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue[Chunk | Done | Failed] = queue.SimpleQueue()

    def send(self, job: Job, event: JobEvent) -> None:
        if isinstance(event, Abandoned):
            event = Failed(job.key, Cancelled("the appliance is shutting down"))
        self.items.put(event)


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def create_app(scheduler: Scheduler, status: StatusBoard, metrics: Metrics, api_key: str | None, *,
               max_body: int = 1 << 20, result_wait: float = 3600.0,
               telemetry: Callable[[], dict[str, Any]] = dict[str, Any], infer: InferencePool | None = None,
               page: Callable[[Flask], None] | None = None, threads: int = 16) -> Flask:
    app = Flask("appliance")
    seats = Seats(threads)
    app.config["MAX_CONTENT_LENGTH"] = max_body

    def error_response(error: ApplianceError, transport_counted: bool = False) -> Response:
        if not transport_counted:
            scheduler.record_error("http", error)
        headers = {"Retry-After": "2"} if error.code == "busy" else {}
        shape = ollama.error_body if request.path.startswith(OLLAMA_PREFIX) else openai.error_body
        return Response(json.dumps(shape(error)), status=int(error.http_status),
                        mimetype="application/json", headers=headers)

    @app.errorhandler(ApplianceError)
    def _appliance_error(error: ApplianceError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        mapped = BadRequest(f"{error.code} {error.name}: {error.description}")
        mapped.http_status = error.code or 500
        return error_response(mapped)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("HTTP handler failed")
        return error_response(Internal(f"internal error ({type(error).__name__})"))

    @app.before_request
    def _authorize() -> Response | None:
        if api_key is None or request.path in PUBLIC_ROUTES:
            return None
        given, browser = presented_key(request.headers.get("Authorization", ""))
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            if request.path == BROWSER_PAGE or request.path.startswith(BROWSER_PREFIX):
                return Response("<!doctype html><title>key needed</title><p>This appliance needs its API key: any "
                                "user name, the key as the password.</p>", status=401, mimetype="text/html",
                                headers={"WWW-Authenticate": 'Basic realm="appliance", charset="UTF-8"'})
            raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer <key>')")
        if browser and request.method == "POST" and request.mimetype != "application/json":
            # a browser repeats Basic credentials on a form another site submits; such forms cannot send JSON
            # without a CORS preflight, which this server never grants
            raise Unauthorized("with browser (Basic) credentials a POST must be application/json")
        return None

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz")
    def readyz() -> tuple[dict[str, Any], int]:
        current = status.current
        body = {"status": current.state, "model": current.model, "reason": current.reason}
        return body, 200 if current.state in SERVING else 503

    @app.get("/status")
    def status_route() -> dict[str, Any]:
        return {**status.current.to_dict(), "outstanding": scheduler.outstanding, "worker_pid": scheduler.worker.pid,
                "telemetry": telemetry()}

    @app.get("/metrics")
    def metrics_route() -> Response:
        return Response(metrics.exposition(), mimetype="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        if scheduler.config.models.switch:
            ids = [e.id for e in scheduler.catalog if e.generates_text]
        else:
            ids = [scheduler.default_model]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "appliance"}
                                           for i in ids]}

    def body_json() -> object:
        return decode_json(request.get_data(cache=False), limit=max_body)

    @app.post("/v1/completions")
    def completions() -> Response:
        body = body_json()
        return serve(openai.completion_request(body), body, "text")

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        body = body_json()
        return serve(openai.chat_request(body), body, "chat")

    @app.post("/v1/infer/<model_id>")
    def infer_route(model_id: str) -> Response | dict[str, Any]:
        """A tensor model (ONNX): {"inputs": {name: nested list}} -> outputs with labels and scores."""
        if infer is None or not infer.models:
            raise UnknownModel(f"unknown tensor model '{model_id}' (available: none)", param="model")
        answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        inputs = body_json()
        give_back = seats.take()
        try:
            infer.submit(model_id, inputs, answers.put, "http")
            answer = answers.get(timeout=result_wait)
        except queue.Empty:
            return error_response(Internal("no reply from the inference worker"))
        finally:
            give_back()
        if isinstance(answer, ApplianceError):
            return error_response(answer, transport_counted=True)
        if not isinstance(answer, TensorResult):  # the pool answers an Infer with a TensorResult or an error
            return error_response(Internal("the inference worker answered with no tensors"))
        return tensor_result_payload(answer)

    def serve(generate_request: GenerateRequest, body: object, kind: str) -> Response:
        return seated(lambda: answer(generate_request, body, kind))

    def seated(make_response: Callable[[], Response]) -> Response:
        """A generation response that holds one of the HTTP seats until waitress closes it."""
        give_back = seats.take()
        try:
            response = make_response()
        except BaseException:
            give_back()
            raise
        # waitress closes every response it was handed, streamed or not, whether or not the client stayed
        response.call_on_close(give_back)
        return response

    def answer(generate_request: GenerateRequest, body: object, kind: str) -> Response:
        job, events = run(generate_request)
        shaper = openai.ResponseShaper(generate_request, job.model_id, kind)
        if not generate_request.stream:
            return final_response(events, lambda c: shaper.full(c), openai.error_body)
        stream = openai_stream(events, shaper, openai.wants_usage_in_stream(body))
        return Response(stream, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def run(generate_request: GenerateRequest) -> tuple[Job, Events]:
        """Submit a request; its events end with one Done or Failed, and leaving them early cancels the job."""
        sink = QueueSink()
        job = scheduler.submit(generate_request, sink, "http")
        return job, job_events(job, sink, request.environ.get("waitress.client_disconnected", lambda: False))

    def job_events(job: Job, sink: QueueSink, disconnected: Callable[[], bool]) -> Events:
        deadline = time.monotonic() + result_wait
        try:
            while True:
                try:
                    event = sink.items.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if disconnected():
                        scheduler.cancel_job(job, Cancelled("the HTTP client disconnected"))
                        yield Failed(job.key, Cancelled("the HTTP client disconnected"))
                        return
                    if time.monotonic() > deadline:
                        scheduler.cancel_job(job)
                        scheduler.record_error("http", Internal("no reply from the scheduler"))
                        yield Failed(job.key, Internal("no reply from the scheduler"))
                        return
                    continue
                yield event
                if isinstance(event, (Done, Failed)):
                    return
        finally:
            if not job.finished:  # the client went away mid-stream: free the worker
                scheduler.cancel_job(job, Cancelled("the HTTP client disconnected"))

    def final_response(events: Events, shape: Callable[[Completion], dict[str, Any]],
                       error_shape: Callable[[ApplianceError], dict[str, Any]]) -> Response:
        with closing(events):
            for event in events:
                match event:
                    case Done(completion=completion):
                        return Response(json.dumps(shape(completion), ensure_ascii=False),
                                        mimetype="application/json")
                    case Failed(error=error):
                        return Response(json.dumps(error_shape(error)), status=int(error.http_status),
                                        mimetype="application/json",
                                        headers={"Retry-After": "2"} if error.code == "busy" else {})
        raise Internal("the job ended without a result")

    def openai_stream(events: Events, shaper: openai.ResponseShaper,
                      include_usage: bool) -> Iterator[bytes]:
        with closing(events):
            first = shaper.first_chunk()
            if first is not None:
                yield _sse(first)
            for event in events:
                match event:
                    case Chunk(text=text):
                        if (chunk := shaper.delta_chunk(text)) is not None:
                            yield _sse(chunk)
                    case Done(completion=completion):
                        for chunk in shaper.final_chunks(completion, include_usage):
                            yield _sse(chunk)
                        yield _sse("[DONE]")
                    case Failed(error=error):
                        yield _sse(openai.error_body(error))
                        yield _sse("[DONE]")

    ollama_routes.register(app, scheduler, status, run, final_response, body_json, seated)
    embed_routes.register(app, infer, body_json, seats.take, error_response, result_wait)
    if page is not None:
        page(app)
    return app


def presented_key(header: str) -> tuple[str, bool]:
    """The key in an Authorization header (Bearer, or Basic with the key as the password) and whether it came the
    browser's way (Basic)."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip(), False
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return "", True
        return decoded.partition(":")[2], True
    return "", False


class HttpServer:
    """waitress in a background thread; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, app: Flask, host: str, port: int, threads: int) -> None:
        # channel_request_lookahead keeps connections readable while a request runs, which is how waitress
        # notices a client that went away (waitress.client_disconnected) before a reply is written
        self._server = create_server(app, host=host, port=port, threads=threads, ident="appliance",
                                     clear_untrusted_proxy_headers=True, channel_request_lookahead=5)
        self.port = int(self._server.effective_port)  # type: ignore[union-attr]  # missing from the stubs
        self.host = host
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._closed = False

    def _run(self) -> None:
        try:
            self._server.run()
        except (OSError, ValueError):
            if not self._closed:
                raise
            # close() from the service's thread closes the sockets under a select() that waitress's loop may be
            # inside (EBADF, or a closed socket's fileno of -1): the shutdown itself, not a fault to log

    def start(self) -> None:
        self._thread.start()
        log.info("HTTP: listening on http://%s:%d", self.host, self.port)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.close()
        self._thread.join(timeout=5)
