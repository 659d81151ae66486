"""`appliance chat`: an interactive chat with a device in the terminal, over HTTP or MQTT, as `ollama run` has it.

Answers stream as they are generated; the conversation is kept for the session (and only there: nothing is
written to disk) and sent with every question. Ctrl-C stops the answer being generated and cancels it on the
device: over HTTP by closing the connection, over MQTT by a message on the cancel topic, whose ``cancelled`` reply
is waited for. The stopped question is left out of the conversation. Ctrl-D (or /bye) quits.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any, TextIO

from appliance.cli.client import Answer, Asker

MULTILINE = '"""'
HELP = """commands:
  /model [ID]      show the model, or use another of the device's catalog from now on
  /system [TEXT]   set your own system message (none: the device's default for the model)
  /reset           forget the conversation so far
  /bye             quit (or Ctrl-D)
  \"\"\"             begin and end a message of several lines
Ctrl-C stops an answer and cancels it on the device."""


class Chat:
    def __init__(self, asker: Asker, *, model: str | None = None, system: str | None = None,
                 params: dict[str, Any] | None = None, timeout: float = 600, verbose: bool = False,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.asker, self.model, self.system = asker, model, system
        self.params, self.timeout, self.verbose = dict(params or {}), timeout, verbose
        self.out, self.err = out, err
        self.history: list[dict[str, Any]] = []  # user and assistant turns that were answered

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- commands ------------------------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to quit."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/help", "/?"):
            self.say(HELP)
        elif name in ("/reset", "/clear"):
            self.history.clear()
            self.say("(conversation cleared)")
        elif name == "/model":
            self._model(rest)
        elif name == "/system":
            self.system = rest or None
            self.say(f"(system message: {rest})" if rest else "(system message: the device's default)")
        else:
            self.say(f"unknown command {name} (/help lists them)")
        return True

    def _model(self, wanted: str) -> None:
        if not wanted:
            self.say(f"(model: {self.model or 'the device default'})")
            return
        known = self.asker.models()
        if known is not None and wanted not in known:
            self.say(f"no model {wanted!r} on the device (available: {', '.join(known) or 'none'})")
            return
        self.model = wanted
        self.say(f"(model: {wanted})")

    # -- a question ----------------------------------------------------------------------------------------------

    def send(self, text: str) -> Answer:
        user = {"role": "user", "content": text}
        system = [{"role": "system", "content": self.system}] if self.system else []
        body = {"messages": [*system, *self.history, user], "stream": True, **self.params}
        if self.model:
            body["model"] = self.model
        shown: list[str] = []

        def show(delta: str) -> None:
            shown.append(delta)
            self.out.write(delta)
            self.out.flush()

        try:
            answer = self.asker.ask(body, on_delta=show, timeout=self.timeout)
        except KeyboardInterrupt:  # a second Ctrl-C while the cancel was being confirmed
            answer = Answer(interrupted=True, error={"code": "cancelled", "message": "stopped (Ctrl-C)"})
        if shown or answer.interrupted:
            self.out.write("\n")
        if answer.interrupted:
            self.say("(cancelled)")
        elif answer.error:
            print(f"error: {answer.error.get('code')}: {answer.error.get('message')}", file=self.err, flush=True)
        else:
            if not shown:
                self.say(answer.text)
            self.history += [user, {"role": "assistant", "content": answer.text}]
            if self.verbose and answer.usage:
                timings = answer.timings or {}
                self.say(f"({answer.usage.get('completion_tokens')} tokens, {timings.get('tokens_per_s')} tok/s, "
                         f"first token after {timings.get('ttft_ms')} ms, {answer.finish_reason})")
        return answer

    # -- the loop ------------------------------------------------------------------------------------------------

    def banner(self, where: str) -> None:
        status = self.asker.status()
        device = (f"device {status.get('device')} ({status.get('state')}), model "
                  f"{self.model or status.get('model')}, " if status.get("device") else "")
        self.say(f"appliance chat: {device}{where}. /help for commands, Ctrl-C stops an answer, Ctrl-D quits.")

    def read(self, read: Callable[[str], str]) -> str | None:
        """One message (several lines between triple quotes); None at end of input."""
        try:
            line = read(">>> ")
        except EOFError:
            return None
        if not line.lstrip().startswith(MULTILINE):
            return line
        first = line.lstrip()[len(MULTILINE):]
        if first.strip().endswith(MULTILINE):  # """all on one line"""
            return first.strip()[:-len(MULTILINE)].strip()
        lines = [first]
        while True:
            try:
                more = read("... ")
            except EOFError:
                return None
            if more.rstrip().endswith(MULTILINE):
                lines.append(more.rstrip()[:-len(MULTILINE)])
                return "\n".join(lines).strip()
            lines.append(more)

    def run(self, read: Callable[[str], str] = input) -> int:
        while True:
            try:
                line = self.read(read)
            except KeyboardInterrupt:  # at the prompt: nothing to stop
                self.say("\n(Ctrl-D or /bye quits)")
                continue
            if line is None:
                self.say("")
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.send(line)


def run(asker: Asker, where: str, **options: Any) -> int:
    """The interactive chat on this terminal; readline gives line editing and recall (in memory only)."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - importing it is what enables line editing for input()
    error = asker.connect()
    if error:
        print(f"error: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    try:
        chat = Chat(asker, **options)
        chat.banner(where)
        return chat.run()
    finally:
        asker.close()
