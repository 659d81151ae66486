"""The `appliance` command. Errors become one clear message and an exit code (2: bad config or usage, 1: failure);
set APPLIANCE_DEBUG=1 to see the traceback instead."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.cli import models as cli_models
from appliance.config import Config, ConfigError, load_config, read_secret, reference_markdown
from appliance.config.loader import read_toml
from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.cli.client import Answer, Asker


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance import logs
    from appliance.service import Service, direct_model_config, load_catalog

    config = _config(args)
    logs.setup(config.logging)
    if args.model:
        config, catalog = direct_model_config(config, Path(args.model))
    else:
        catalog = load_catalog(config)
    service = Service(config, catalog)
    service.start()
    service.run_until_stopped()
    return service.exit_code


def _asker(args: argparse.Namespace, config: Config, *, chat: bool) -> Asker:
    """Where `ask` and `chat` send requests: MQTT with --mqtt (the fleet topic unless --device), else HTTP."""
    from appliance.cli import client

    if args.mqtt is not None:
        host, port = client.parse_host_port(args.mqtt or f"{config.mqtt.host or '127.0.0.1'}:{config.mqtt.port}")
        prefix = config.mqtt.topic_prefix
        topic = f"{prefix}/{args.device}/generate" if args.device else f"{prefix}/fleet/generate"
        password = read_secret(config.mqtt.password_file) if config.mqtt.password_file else None
        return client.MqttAsker(host, port, topic, protocol=args.protocol, username=config.mqtt.username or None,
                                password=password, reply_prefix=f"{prefix}/client")
    url = args.http or f"http://{_client_host(config.http.bind)}:{config.http.port}"
    api_key = read_secret(config.http.api_key_file) if config.http.api_key_file else None
    if args.api_key_file:
        api_key = read_secret(Path(args.api_key_file))
    return client.HttpAsker(url, api_key=api_key, chat=chat)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature)) if v is not None}


def cmd_ask(args: argparse.Namespace) -> int:
    config = _config(args)
    body: dict[str, Any] = {"stream": args.stream, **_sampling(args)}
    if args.model:
        body["model"] = args.model
    if args.raw:
        body["prompt"] = args.prompt
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        body["messages"] = [*system, {"role": "user", "content": args.prompt}]

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    answer: Answer | None
    if args.wyoming is not None:  # one Assist turn: the device's own conversation, no sampling options
        from appliance.cli.client import parse_host_port
        from appliance.transports.wyoming_client import ask_wyoming
        host, port = parse_host_port(args.wyoming or f"{_client_host(config.wyoming.bind)}:{config.wyoming.port}",
                                     config.wyoming.port)
        error, answer = None, ask_wyoming(host, port, args.prompt, on_delta=show if args.stream else lambda s: None,
                                          timeout=args.timeout)
    else:
        asker = _asker(args, config, chat=not args.raw)
        error = asker.connect()
        try:
            answer = asker.ask(body, on_delta=show, timeout=args.timeout) if error is None else None
        finally:
            asker.close()
    if answer is None or answer.error:
        error = error or (answer.error if answer is not None else None) or {}
        if args.stream and answer is not None and answer.text:
            sys.stdout.write("\n")
        print(f"error: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    print("" if args.stream else answer.text)
    if args.verbose:
        print(json.dumps({"finish_reason": answer.finish_reason, "usage": answer.usage, "timings": answer.timings}),
              file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from appliance.cli import chat

    config = _config(args)
    asker = _asker(args, config, chat=True)
    return chat.run(asker, str(asker), model=args.model, system=args.system, params=_sampling(args),
                    timeout=args.timeout, verbose=args.verbose)


def _client_host(bind: str) -> str:
    return "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind


def cmd_status(args: argparse.Namespace) -> int:
    from appliance.cli import client

    config = _config(args)
    url = args.http or f"http://{_client_host(config.http.bind)}:{config.http.port}"
    api_key = read_secret(config.http.api_key_file) if config.http.api_key_file else None
    status = client.get_status(url, api_key=api_key)
    if "error" in status and "state" not in status:
        print(f"error: {status['error'].get('message')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(client.format_status(status))
    return 0 if status.get("state") in ("ready", "busy") else 3


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "reference":
        print(reference_markdown())
        return 0
    if args.action == "show":
        print(json.dumps(read_toml(Path(args.file)), default=str))
        return 0
    load_config(args.file)  # raises ConfigError listing every problem
    print(f"{args.file}: ok")
    return 0


def cmd_firstboot(args: argparse.Namespace) -> int:
    import logging

    from appliance import firstboot

    # plain lines: systemd sends them to the journal and to the console, where an operator with a screen looks
    logging.basicConfig(level=logging.INFO, format="appliance-firstboot: %(message)s", stream=sys.stdout)
    report = firstboot.run(Path(args.boot), root=Path(args.root), state_dir=Path(args.state_dir),
                           live=args.root == "/")
    return 1 if report["problems"] else 0


def cmd_mqtt_users(args: argparse.Namespace) -> int:
    from appliance.config.credentials import account_problems
    from appliance.firstboot.accounts import set_mqtt_users

    try:
        users = json.load(sys.stdin)  # on stdin, never on a command line where `ps` would show the passwords
    except ValueError as exc:
        raise ConfigError([f"stdin: not JSON: {exc}"]) from None
    if not isinstance(users, dict):
        raise ConfigError(["stdin: expected a JSON object of user name -> password"])
    if problems := account_problems(users, "stdin"):
        raise ConfigError(problems)  # names the accounts, never their passwords (Ansible shows this on failure)
    accounts, changed = set_mqtt_users(Path(args.root), users, exact=args.exact)
    print(json.dumps({"changed": changed, "accounts": accounts}))
    return 0


def _client_options(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """Where to send requests and how: the options `ask` and `chat` share; returns the group of where-to options."""
    p.add_argument("-c", "--config", help="read broker/HTTP addresses and secrets from this config")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--mqtt", nargs="?", const="", metavar="HOST:PORT",
                       help="over MQTT (default address from the config)")
    where.add_argument("--http", metavar="URL", help="over HTTP (the default; URL from the config)")
    p.add_argument("--device", help="MQTT: this device's topic instead of the fleet topic")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT protocol version")
    p.add_argument("--model", help="model id from the catalog (default: the device's default model)")
    p.add_argument("--system", help="your own system message (default: the one the device's catalog gives the "
                   "model)")
    p.add_argument("--max-tokens", type=int, help="default: the device's worker.default_max_tokens")
    p.add_argument("--temperature", type=float)
    p.add_argument("--api-key-file", help="HTTP API key file")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for an answer")
    return where


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Offline LLM appliance: serve a quantized model "
                                     "over MQTT and HTTP, and talk to it.")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("-c", "--config", help="TOML config file (default: built-in defaults + APPLIANCE_* env)")
    serve.add_argument("--model", metavar="FILE.gguf", help="serve this GGUF file directly, no catalog entry needed")
    serve.set_defaults(func=cmd_serve)

    ask = sub.add_parser("ask", help="send one question (or, with --raw, a prompt to complete) and print the answer")
    ask.add_argument("prompt")
    where = _client_options(ask)
    where.add_argument("--wyoming", nargs="?", const="", metavar="HOST:PORT",
                       help="ask the Wyoming conversation agent, as Home Assistant's Assist does")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--raw", action="store_true", help="send a plain completion prompt instead of a chat message "
                     "(no chat template, no system prompt)")
    ask.add_argument("-v", "--verbose", action="store_true", help="print usage and timings to stderr")
    ask.set_defaults(func=cmd_ask)

    chat = sub.add_parser("chat", help="talk with a device in this terminal: streamed answers, the conversation "
                          "kept for the session, /reset, /model ID; Ctrl-C stops an answer, Ctrl-D quits")
    _client_options(chat)
    chat.add_argument("-v", "--verbose", action="store_true", help="print tokens and speed after each answer")
    chat.set_defaults(func=cmd_chat)

    cli_models.add_parser(sub)

    status = sub.add_parser("status", help="state, model, temperature, memory and throttle flags of a running "
                            "appliance (exit 0 when serving, 3 otherwise)")
    status.add_argument("-c", "--config", help="read the HTTP address and API key from this config")
    status.add_argument("--http", metavar="URL", help="the appliance's HTTP address")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    firstboot = sub.add_parser("firstboot", help="(root, at boot) make the device its own and apply the settings "
                               "left on the boot partition (docs/image.md)")
    firstboot.add_argument("--boot", default="/boot/firmware", help="where the FAT boot partition is mounted")
    firstboot.add_argument("--state-dir", default="/var/lib/appliance")
    users = sub.add_parser("mqtt-users", help="(root) set the broker accounts from a JSON object on stdin "
                           "(name -> password, \"\" removes); prints whether anything changed")
    users.add_argument("--exact", action="store_true", help="remove operator accounts that are not listed")
    for command, func in ((firstboot, cmd_firstboot), (users, cmd_mqtt_users)):
        command.add_argument("--root", default="/", help="the system to change (a scratch tree in tests)")
        command.set_defaults(func=func)

    config = sub.add_parser("config", help="check a config file, or print the reference")
    config_sub = config.add_subparsers(dest="action", required=True)
    check = config_sub.add_parser("check", help="validate a config file and print every problem")
    check.add_argument("file")
    config_sub.add_parser("reference", help="print the config reference (Markdown)")
    show = config_sub.add_parser("show", help="print the keys a config file sets, as JSON (no defaults added; the "
                                 "Ansible role reads what first boot set with it)")
    show.add_argument("file")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        if os.environ.get("APPLIANCE_DEBUG"):
            raise
        print(exc.message, file=sys.stderr)
        return 2
    except ApplianceError as exc:
        if os.environ.get("APPLIANCE_DEBUG"):
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
