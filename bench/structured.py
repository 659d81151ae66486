"""Structured output on the embedded default model: N answers over 10 JSON schemas, each validated with
``jsonschema``, through the real ``openai`` client against a running appliance; and constrained tokens/s as a ratio
to unconstrained tokens/s measured in the same run.

    .venv/bin/python -m bench.structured --per-schema 20      # 200 answers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import openai

from appliance.catalog import default_model
from appliance.config import toml_text as toml
from tests.support.harness import new_appliance

SCHEMAS: dict[str, dict] = {
    "weather": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "sky": {"enum": ["sunny", "cloudy", "rain", "snow"]},
        "celsius": {"type": "integer", "minimum": -30, "maximum": 50}}, "required": ["city", "sky", "celsius"]},
    "sensor": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}, "ok": {"type": "boolean"},
        "battery": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["id", "ok", "battery"]},
    "shopping": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4}},
        "required": ["items"]},
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 25},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"enum": ["es", "zh", "en"]}, "minItems": 1, "maxItems": 3}},
        "required": ["name", "age", "languages"]},
    "nested": {"type": "object", "properties": {
        "device": {"type": "object", "properties": {
            "room": {"enum": ["kitchen", "hall", "barn"]}, "floor": {"type": "integer", "minimum": 0, "maximum": 3}},
            "required": ["room", "floor"]},
        "action": {"enum": ["on", "off", "toggle"]}}, "required": ["device", "action"]},
    "yes_no": {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                                "confidence": {"type": "integer", "minimum": 1, "maximum": 5}},
               "required": ["answer", "confidence"]},
    "date": {"type": "object", "properties": {"event": {"type": "string", "maxLength": 30},
                                              "when": {"type": "string", "format": "date"}},
             "required": ["event", "when"]},
    "optional": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 30}, "note": {"anyOf": [{"type": "string", "maxLength": 20},
                                                                         {"type": "null"}]}},
        "required": ["title"]},
    "matrix": {"type": "object", "properties": {
        "rows": {"type": "array", "minItems": 2, "maxItems": 2,
                 "items": {"type": "array", "minItems": 2, "maxItems": 2,
                           "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}, "required": ["rows"]},
    "tags": {"type": "object", "properties": {
        "priority": {"enum": ["low", "normal", "high"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "count": {"type": "number"}}, "required": ["priority", "tags", "count"]},
}
PROMPTS = {
    "weather": "Describe the weather in Madrid today as JSON.",
    "sensor": "Report the state of sensor abc-12 as JSON.",
    "shopping": "List what to buy for a soup as JSON.",
    "person": "Describe a farmer who speaks Spanish and Chinese as JSON.",
    "nested": "Turn on the light in the kitchen on the ground floor. Answer as JSON.",
    "yes_no": "Is water wet? Answer as JSON.",
    "date": "When is the village market? Answer as JSON.",
    "optional": "Give a title for a note about irrigation, as JSON.",
    "matrix": "Write a 2x2 grid of digits as JSON.",
    "tags": "Tag this message: 'the pump in the north field is broken'. Answer as JSON.",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-schema", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    table = {**default_model.catalog_table(), "file": str(default_model.installed_file())}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        catalog = workdir / "catalog.toml"
        catalog.write_text("\n".join(toml.table("models", table, array=True)) + "\n")
        app = new_appliance(workdir, None, catalog, default_model.MODEL_ID,
                            {"worker": {"threads": args.threads, "request_timeout": 600},
                             "logging": {"level": "warning"}})
        app.start(timeout=180)
        try:
            return run(app.http_url, args)
        finally:
            app.stop()


def run(url: str, args: argparse.Namespace) -> int:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
    valid = invalid = truncated = 0
    constrained_tokens, constrained_seconds = 0, 0.0
    for name, schema in SCHEMAS.items():
        for i in range(args.per_schema):
            started = time.perf_counter()
            try:
                reply = client.chat.completions.create(
                    model=default_model.MODEL_ID, messages=[{"role": "user", "content": PROMPTS[name]}],
                    max_tokens=args.max_tokens, seed=i, temperature=0.7,
                    response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}})
            except openai.APIStatusError as exc:
                if exc.status_code == 422:
                    truncated += 1
                    continue
                raise
            constrained_seconds += time.perf_counter() - started
            constrained_tokens += reply.usage.completion_tokens if reply.usage else 0
            try:
                jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                invalid += 1
                print(f"INVALID {name}: {reply.choices[0].message.content!r}: {exc}", file=sys.stderr)
        print(f"{name}: {valid} valid, {invalid} invalid, {truncated} truncated so far", flush=True)
    free_tokens, free_seconds = 0, 0.0
    for name in SCHEMAS:
        for i in range(max(1, args.per_schema // 4)):
            started = time.perf_counter()
            reply = client.chat.completions.create(
                model=default_model.MODEL_ID, messages=[{"role": "user", "content": PROMPTS[name]}],
                max_tokens=args.max_tokens, seed=i, temperature=0.7)
            free_seconds += time.perf_counter() - started
            free_tokens += reply.usage.completion_tokens if reply.usage else 0
    constrained_rate = constrained_tokens / max(constrained_seconds, 1e-9)
    free_rate = free_tokens / max(free_seconds, 1e-9)
    total = valid + invalid + truncated
    print(json.dumps({"answers": total, "valid": valid, "invalid": invalid, "truncated": truncated,
                      "constrained_tok_s": round(constrained_rate, 1), "unconstrained_tok_s": round(free_rate, 1),
                      "ratio": round(constrained_rate / free_rate, 3)}))
    return 0 if invalid == 0 and truncated == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
