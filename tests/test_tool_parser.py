"""The <tool_call> parser: however the text is split into pieces, the result is the whole text's."""
from hypothesis import given, settings, strategies as st

from app.output import Output
from app.tools import ToolCallParser

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>'
PIECES = [CALL, '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', "<tool_call>{broken</tool_call>",
          "Sure, ", "\n", "  ", "text", "<", "<tool", "</tool_call>", "<tool_call>", "你好🎉", '{"name": 1}']


def collect(tool_names, text):
    """A whole answer through the post-processing every API uses (app/output.py): (content, calls)."""
    return Output(tool_names).whole(text, "stop")


def through(pieces):
    parser = ToolCallParser(["get_weather"])
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    content = "".join(v for k, v in events if k == "content")
    return content, [(c.name, c.arguments) for k, c in events if k == "call"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=8), st.lists(st.integers(1, 9), min_size=1, max_size=40))
def test_any_split_gives_the_whole_answer(parts, cuts):
    text = "".join(parts)
    pieces, at, i = [], 0, 0
    while at < len(text):
        step = cuts[i % len(cuts)]
        pieces.append(text[at:at + step])
        at, i = at + step, i + 1
    whole_content, whole_calls = collect(["get_weather"], text)
    assert through(pieces) == (whole_content, [(c.name, c.arguments) for c in whole_calls])


def test_content_is_the_outside_text_stripped():
    content, calls = collect(["get_weather"], f"  Let me look.\n{CALL}\nAnd more\n{CALL}\n")
    assert content == "Let me look.\n\nAnd more" and len(calls) == 2


def test_invalid_blocks_and_unterminated_blocks_stay_text():
    text = '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call> and <tool_call>\n{"name": "get_w'
    content, calls = collect(["get_weather"], text)
    assert content == text and calls == []


def test_arguments_as_a_json_string_are_accepted():
    content, calls = collect(["f"], '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert content == "" and calls[0].arguments == {"a": 1}


def test_absurdly_nested_json_from_the_model_stays_text():
    text = "<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>"
    content, calls = collect(["f"], text)
    assert content == text and calls == []
