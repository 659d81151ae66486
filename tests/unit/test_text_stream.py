"""Releasing generated text: whole characters only, nothing that may still become a stop sequence."""

from __future__ import annotations

from appliance.backends.text import TextStream, held_back


def test_held_back_tail():
    assert held_back("abc<|im", ("<|im_end|>",)) == 4
    assert held_back("abc", ("<|im_end|>",)) == 0
    assert held_back("x###", ("### Instruction:", "##")) == 3


def test_a_character_split_across_tokens_is_released_whole():
    stream = TextStream(())
    snowman = "☃".encode()
    stream.push(b"a" + snowman[:1])
    assert stream.inside_character
    assert stream.release() == "a"
    stream.push(snowman[1:])
    assert not stream.inside_character
    assert stream.release() == "☃"
    assert stream.finish() == ""


def test_a_possible_stop_prefix_waits_and_a_stop_cuts_the_text():
    stream = TextStream(("\n\nUser:",))
    stream.push(b"Hi.\n\nUs")
    assert not stream.find_stop()
    assert stream.release() == "Hi."
    stream.push(b"er: more")
    assert stream.find_stop()
    assert stream.text == "Hi."
    assert stream.finish() == ""


def test_a_false_alarm_is_released_in_order():
    stream = TextStream(("###",))
    pieces = []
    for chunk in (b"a#", b"#", b"b"):
        stream.push(chunk)
        assert not stream.find_stop()
        pieces.append(stream.release())
    pieces.append(stream.finish())
    assert pieces == ["a", "", "##b", ""]
    assert "".join(pieces) == stream.text == "a##b"


def test_an_unfinished_character_at_the_end_is_dropped():
    stream = TextStream(())
    stream.push("é".encode()[:1])
    assert stream.finish() == ""
    assert stream.text == ""
