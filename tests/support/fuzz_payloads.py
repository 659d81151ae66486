"""What the fuzz campaign sends (issue 10): generated payloads for every way into the appliance.

Four kinds of body, mixed by hypothesis: requests built from the protocol's own field names with values that are
sometimes right and often wrong (the shapes that reach deepest), arbitrary JSON, bytes (cut or flipped JSON, random
bytes, invalid UTF-8) and the hand-written hostile cases below (deep nesting, huge numbers, NaN...). Each body goes
to one target: MQTT generate (v5 or 3.1.1), MQTT infer, MQTT embed, or an HTTP route (every route the service has,
with the methods it does and does not take). The campaign (tests/support/fuzz_campaign.py) sends them and checks
the answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import strategies as st

#: kinds of hostile JSON a parser meets; each must be `bad_request` on every transport (tests/integration)
HOSTILE: dict[str, bytes] = {
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep objects": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "huge integer": b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",
    "NaN": b'{"prompt": "a", "temperature": NaN}',
    "Infinity": b'{"prompt": "a", "temperature": Infinity}',
    "overflowing float": b'{"prompt": "a", "temperature": 1e999}',
    "invalid UTF-8": b'{"prompt": "\xff\xfe"}',
    "lone surrogate": b'{"prompt": "\\ud800", "id": "\\udc00"}',
    "duplicate keys": b'{"prompt": "a", "prompt": "b"}',
    "wrong type: prompt": b'{"prompt": {"a": 1}}',
    "wrong type: messages": b'{"messages": [{"role": "user", "content": [1]}]}',
    "wrong type: max_tokens": b'{"prompt": "a", "max_tokens": "12"}',
    "wrong type: stop": b'{"prompt": "a", "stop": [[]]}',
    "wrong type: stream": b'{"prompt": "a", "stream": "yes"}',
    "wrong type: seed": b'{"prompt": "a", "seed": 1.5}',
    "wrong type: model": b'{"prompt": "a", "model": ["tiny"]}',
    "wrong type: priority": b'{"prompt": "a", "priority": {}}',
    "not an object": b"[1, 2, 3]",
}

#: (method, path) of every HTTP route; POST routes get a body, the others a query string
HTTP_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/infer/{infer}"),
    ("POST", "/v1/infer/no-such-model"), ("POST", "/v1/embeddings"), ("POST", "/api/embed"),
    ("POST", "/api/generate"), ("POST", "/api/chat"), ("POST", "/api/show"),
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/status"), ("GET", "/metrics"), ("GET", "/v1/models"),
    ("GET", "/api/version"), ("HEAD", "/api/version"), ("GET", "/api/tags"), ("GET", "/api/ps"), ("GET", "/"),
    ("GET", "/ui/panel"), ("GET", "/favicon.ico"),
    # what a confused client does: wrong methods, unknown paths, the routes Ollama has and the appliance does not
    ("GET", "/v1/completions"), ("PUT", "/v1/chat/completions"), ("DELETE", "/api/tags"), ("POST", "/api/pull"),
    ("GET", "/v1/%ff%fe"), ("POST", "/../../etc/passwd"),
)


@dataclass(frozen=True)
class Payload:
    """One generated request: where it goes and what it carries."""

    target: str  # "mqtt5", "mqtt311", "mqtt5-infer", "mqtt5-embed" or "http"
    body: bytes
    method: str = "POST"  # http only
    path: str = ""  # http only: the route, with a query string on GET routes
    stream_hint: bool = False  # the body asked for a stream (for the report only)

    def describe(self, limit: int = 160) -> str:
        head = self.body[:limit].decode("utf-8", "backslashreplace")
        return f"{self.target} {self.method} {self.path} {head!r}{'...' if len(self.body) > limit else ''}"


def _scalar() -> st.SearchStrategy:
    return st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))


JSON = st.recursive(_scalar(), lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                    max_leaves=12)

# reply topics a requester should never be able to use, and a few odd but legal ones
TOPICS = st.one_of(st.sampled_from(["#", "+", "", "a/#", "a/+/b", "$SYS/x", "appliance/x/generate", "a\x00b",
                                    "replies/other/x", "t" * 70_000, "/", "//"]), st.text(max_size=30))

CLASSIFIER_SIZE = 64  # the input width of the campaign's ONNX text classifier (tiny_onnx.write_text_classifier)
SMALL_TOKENS = st.integers(min_value=-3, max_value=12)
TEXT = st.one_of(st.text(max_size=60), st.sampled_from(["Name three colours.", "¿Qué hora es?", "你好，世界",
                                                        "a" * 3000, "\x00\x01", "😀" * 50]))
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant"]),
                                                             JSON),
                                           "content": st.one_of(TEXT, JSON)}), max_size=4)
SCHEMA = st.one_of(st.just({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
                   st.just({"type": "string", "pattern": "^(a|b)+$"}), st.just({"not": {}}),
                   st.dictionaries(st.sampled_from(["type", "properties", "enum", "$ref", "items", "minimum"]),
                                   JSON, max_size=3))

#: per field, values a client would plausibly send (often valid), mixed with arbitrary JSON
FIELDS: dict[str, st.SearchStrategy] = {
    "id": st.one_of(st.text(max_size=20), st.integers(), st.text(min_size=257, max_size=300)),
    "prompt": TEXT,
    "messages": MESSAGES,
    "model": st.sampled_from(["tiny", "tiny-chat", "slow", "no-such-model", "", "tiny:latest", "guard"]),
    "max_tokens": SMALL_TOKENS, "max_completion_tokens": SMALL_TOKENS,
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-5, 100),
    "repeat_penalty": st.floats(0, 3), "seed": st.integers(-5, 2**64),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=10)),
    "stream": st.booleans(), "priority": st.sampled_from(["low", "normal", "high"]),
    "reply_to": TOPICS,
    "format": st.one_of(st.sampled_from(["json", "", "xml"]), SCHEMA), "json_schema": SCHEMA,
    "grammar": st.one_of(st.sampled_from(['root ::= "yes" | "no"', "root ::=", "root ::= root"]), st.text(max_size=30)),
    "response_format": st.one_of(st.just({"type": "json_object"}), st.just({"type": "text"}),
                                 st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}},
                                           SCHEMA)),
    "options": st.dictionaries(st.sampled_from(["num_predict", "temperature", "seed", "num_ctx", "stop", "top_k"]),
                               st.one_of(SMALL_TOKENS, JSON), max_size=3),
    "keep_alive": st.one_of(st.sampled_from(["5m", "0", "-1", "1h", "soon"]), st.integers(-5, 10**6)),
    "text": TEXT, "inputs": JSON, "raw": st.booleans(), "suffix": TEXT, "tools": JSON, "images": JSON,
    "logprobs": JSON, "n": st.integers(-1, 3), "echo": st.booleans(), "stream_options": JSON,
}


@st.composite
def request_object(draw) -> dict:
    """A request made of the protocol's field names: a few of them, right or wrong, and maybe an unknown key."""
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True))
    body = {name: draw(st.one_of(FIELDS[name], JSON) if draw(st.integers(0, 9)) == 0 else FIELDS[name])
            for name in names}
    if draw(st.booleans()):  # most requests carry something to generate from
        body.setdefault("prompt", draw(TEXT))
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=10))] = draw(JSON)
    body.setdefault("max_tokens", draw(SMALL_TOKENS))  # bounded, so a valid request is answered in milliseconds
    return body


@st.composite
def valid_request(draw) -> dict:
    """A generation the appliance should run: a prompt or messages and a few right settings. These reach the
    scheduler, the worker and the replies."""
    body: dict = draw(st.one_of(st.fixed_dictionaries({"prompt": TEXT}),
                                st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
                                    {"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}),
                                    min_size=1, max_size=3)})))
    body["max_tokens"] = draw(st.integers(1, 8))
    optional = {"stream": st.booleans(), "temperature": st.floats(0, 1.5), "seed": st.integers(0, 2**31),
                "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "model": st.sampled_from(["tiny",
                "tiny-chat"]), "id": st.text(min_size=1, max_size=20), "priority": st.sampled_from(["low", "normal"]),
                "format": st.just("json"), "top_k": st.integers(1, 50)}
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True)):
        body[name] = draw(optional[name])
    return body


@st.composite
def valid_infer(draw) -> dict:
    """An infer request for the campaign's classifier: one or two rows of its input width, maybe an id."""
    row = st.lists(st.floats(-4, 4), min_size=CLASSIFIER_SIZE, max_size=CLASSIFIER_SIZE)
    body: dict = {"inputs": {"features": draw(st.lists(row, min_size=1, max_size=2))}}
    if draw(st.booleans()):
        body["id"] = draw(st.text(min_size=1, max_size=20))
    return body


@st.composite
def valid_embed(draw) -> dict:
    """An embedding request in the OpenAI and Ollama shape: ``input`` is one text or a list; the tiny embedder
    knows a few words (tiny_onnx.EMBED_VOCAB) and takes 8 word pieces."""
    words = st.lists(st.sampled_from(["cat", "dog", "car", "red", "zebra"]), min_size=1, max_size=5).map(" ".join)
    body: dict = {"input": draw(st.one_of(words, st.lists(words, min_size=1, max_size=4)))}
    if draw(st.booleans()):
        body["model"] = "tiny-embed"
    if draw(st.integers(0, 3)) == 0:
        body["truncate"] = True
    return body


def _encode(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def mangled(draw) -> bytes:
    """A valid-looking request, then cut short or with a byte flipped: what a flaky link delivers."""
    raw = _encode(draw(request_object()))
    at = draw(st.integers(0, max(len(raw) - 1, 0)))
    if draw(st.booleans()):
        return raw[:at]
    return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]


ANY_BODY = st.one_of(request_object().map(_encode), request_object().map(_encode), JSON.map(_encode), mangled(),
                     st.binary(max_size=200), st.sampled_from(sorted(HOSTILE.values())))
#: about a third valid, so that the deep paths (scheduler, worker, replies) are fuzzed too, not only the parsers
GENERATE_BODY = st.one_of(valid_request().map(_encode), valid_request().map(_encode), ANY_BODY, ANY_BODY)
INFER_BODY = st.one_of(valid_infer().map(_encode), valid_infer().map(_encode), ANY_BODY, ANY_BODY)
EMBED_BODY = st.one_of(valid_embed().map(_encode), valid_embed().map(_encode), ANY_BODY, ANY_BODY)

QUERY = st.one_of(st.just(""), st.builds(lambda k, v: f"?{k}={v}", st.sampled_from(["model", "x", "%zz", "a[]"]),
                                        st.text(alphabet="abc%01&=+", max_size=10)))


@st.composite
def payloads(draw, infer_model: str) -> Payload:
    """One payload for one target; MQTT and HTTP about equally often."""
    target = draw(st.sampled_from(["mqtt5", "mqtt311", "mqtt5-infer", "mqtt5-embed", "http", "http", "http", "http"]))
    method, path = draw(st.sampled_from(HTTP_ROUTES)) if target == "http" else ("POST", "")
    path = path.format(infer=infer_model)
    if target == "mqtt5-infer" or path.startswith("/v1/infer"):
        body = draw(INFER_BODY)
    elif target == "mqtt5-embed" or path in ("/v1/embeddings", "/api/embed"):
        body = draw(EMBED_BODY)
    else:
        body = draw(GENERATE_BODY)
    stream = b'"stream": true' in body
    if target != "http":
        return Payload(target, body, stream_hint=stream)
    if method in ("GET", "HEAD"):
        return Payload(target, b"", method=method, path=path + draw(QUERY))
    return Payload(target, body, method=method, path=path, stream_hint=stream)
