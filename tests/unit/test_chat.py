"""The chat's bookkeeping: what each question sends, what the conversation keeps, and how lines are read. (The chat
itself, in a terminal against a real device, is tests/integration/test_chat.py.)"""

from __future__ import annotations

import io

from appliance.cli.chat import Chat
from appliance.cli.client import Answer


class ScriptedAsker:
    """Answers from a list; records each request body."""

    def __init__(self, *answers: Answer, models: list[str] | None = None) -> None:
        self.answers, self.bodies, self._models = list(answers), [], models

    def ask(self, body, *, on_delta, timeout):
        self.bodies.append(body)
        answer = self.answers.pop(0)
        if not answer.error:
            on_delta(answer.text)
        return answer

    def models(self):
        return self._models


def new_chat(asker, **options) -> tuple[Chat, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Chat(asker, out=out, err=err, **options), out, err


def test_answered_turns_travel_with_the_next_question_and_reset_forgets_them():
    asker = ScriptedAsker(Answer(text="Red, blue, green."), Answer(text="Pink."), Answer(text="Hello."))
    chat, out, _ = new_chat(asker, params={"temperature": 0})
    chat.send("Name three colours.")
    chat.send("One more?")
    assert asker.bodies[1]["messages"] == [{"role": "user", "content": "Name three colours."},
                                           {"role": "assistant", "content": "Red, blue, green."},
                                           {"role": "user", "content": "One more?"}]
    assert asker.bodies[1]["stream"] is True and asker.bodies[1]["temperature"] == 0
    chat.command("/reset")
    chat.send("Hi")
    assert asker.bodies[2]["messages"] == [{"role": "user", "content": "Hi"}]
    assert "Red, blue, green.\n" in out.getvalue() and "(conversation cleared)" in out.getvalue()


def test_a_cancelled_or_failed_question_is_left_out_of_the_conversation():
    asker = ScriptedAsker(Answer(text="Once upon", interrupted=True, error={"code": "cancelled", "message": "x"}),
                          Answer(error={"code": "busy", "message": "the queue is full"}), Answer(text="Yes."))
    chat, out, err = new_chat(asker)
    chat.send("Tell a story.")
    chat.send("Again?")
    chat.send("Still there?")
    assert asker.bodies[2]["messages"] == [{"role": "user", "content": "Still there?"}]
    assert "(cancelled)" in out.getvalue() and "error: busy: the queue is full" in err.getvalue()


def test_model_and_system_commands_shape_the_request():
    asker = ScriptedAsker(Answer(text="ok"), models=["smollm2-135m-instruct", "qwen"])
    chat, out, _ = new_chat(asker)
    chat.command("/model nope")
    assert "no model 'nope' on the device (available: smollm2-135m-instruct, qwen)" in out.getvalue()
    chat.command("/model qwen")
    chat.command("/system Answer in Spanish.")
    chat.send("Hi")
    assert asker.bodies[0]["model"] == "qwen"
    assert asker.bodies[0]["messages"][0] == {"role": "system", "content": "Answer in Spanish."}
    assert chat.command("/bye") is False and chat.command("/help") is True


def test_triple_quotes_make_one_message_of_several_lines():
    chat, _, _ = new_chat(ScriptedAsker())
    lines = iter(['"""First line', "second line", 'third"""'])
    assert chat.read(lambda prompt: next(lines)) == "First line\nsecond line\nthird"
    assert chat.read(lambda prompt: '"""one line"""') == "one line"
    assert chat.read(lambda prompt: "plain") == "plain"


def test_end_of_input_ends_the_chat():
    chat, _, _ = new_chat(ScriptedAsker())

    def closed(prompt):
        raise EOFError

    assert chat.run(closed) == 0
