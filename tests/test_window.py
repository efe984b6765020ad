"""Fitting a conversation to the 1024-token window (app/window.py), against the real tokenizer and template.

tests/fixtures/open_webui_tools.json stands in for the 36 tool definitions Open WebUI 0.12 attaches to every
chat request in its default (native) function-calling mode: the same names, descriptions of our own.
"""
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from app.errors import APIError
from app.window import Conversation, fit
from tests.helpers import PROJECT_DIR

OPEN_WEBUI_TOOLS = json.loads((PROJECT_DIR / "tests" / "fixtures" / "open_webui_tools.json").read_text())
WINDOW, RESERVE = 1024, 256


def exchange(i, words=20, tool=False):
    """One user turn and what follows it; with `tool`, an assistant tool call and its result come first."""
    out = [{"role": "user", "content": f"question {i}: " + "word " * words}]
    if tool:
        call = {"type": "function", "function": {"name": "search_notes", "arguments": {"query": f"q{i}"}}}
        out += [{"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": f"result of call {i}"}]
    out.append({"role": "assistant", "content": f"answer {i}: " + "more " * words})
    return out


def test_counts_add_up_to_the_whole_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(12):
        messages += exchange(i, words=i, tool=i % 3 == 0)
    messages += [{"role": "system", "content": "A later system turn."}, {"role": "user", "content": "last"}]
    conversation = Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS[:5])
    total = (conversation.head_tokens(conversation.tools) + sum(g.tokens for g in conversation.groups)
             + tokenizer.ending_tokens("generate"))
    assert total == len(tokenizer.chat_ids(messages, OPEN_WEBUI_TOOLS[:5]))


TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
ROLE = st.sampled_from(["user", "assistant", "system", "tool_exchange"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first_system=st.booleans(), turns=st.lists(st.tuples(ROLE, TEXT), max_size=12), last=TEXT,
       tools=st.integers(0, 3))
def test_counts_add_up_for_any_conversation(tokenizer, first_system, turns, last, tools):
    messages = [{"role": "system", "content": "S"}] if first_system else []
    for role, text in turns:
        if role == "tool_exchange":
            messages += [{"role": "assistant", "content": text, "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"x": text}}}]},
                         {"role": "tool", "content": text}, {"role": "tool", "content": text + "2"}]
        else:
            messages.append({"role": role, "content": text})
    messages.append({"role": "user", "content": last})
    conversation = Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS[:tools])
    total = (conversation.head_tokens(conversation.tools) + sum(g.tokens for g in conversation.groups)
             + tokenizer.ending_tokens("generate"))
    assert total == len(tokenizer.chat_ids(messages, OPEN_WEBUI_TOOLS[:tools] or None))


def test_a_conversation_that_fits_is_untouched(tokenizer):
    messages = exchange(0) + [{"role": "user", "content": "hello"}]
    fitted = fit(Conversation(tokenizer, messages), WINDOW, RESERVE)
    assert fitted.prompt_ids == tokenizer.chat_ids(messages) and not fitted.headers()


def test_open_webuis_default_request_drops_the_tools(tokenizer):
    messages = [{"role": "user", "content": "Hi, how are you?"}]
    assert len(tokenizer.chat_ids(messages, OPEN_WEBUI_TOOLS)) > 3000
    fitted = fit(Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS), WINDOW, RESERVE)
    assert fitted.prompt_ids == tokenizer.chat_ids(messages)
    assert (fitted.dropped_tools, fitted.dropped_messages) == (36, 0)


def test_a_tool_named_by_tool_choice_stays(tokenizer):
    messages = [{"role": "user", "content": "Note this down"}]
    named = OPEN_WEBUI_TOOLS[22]
    instruction = "Call write_note."
    fitted = fit(Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS, keep_tool="write_note",
                              format_instruction=instruction),
                 WINDOW, RESERVE)
    expected = tokenizer.chat_ids(messages + [{"role": "system", "content": instruction}], [named])
    assert fitted.prompt_ids == expected and fitted.dropped_tools == 35


def test_history_goes_oldest_first_as_whole_exchanges(tokenizer):
    system = {"role": "system", "content": "You are terse."}
    history = [m for i in range(30) for m in exchange(i, words=15, tool=i % 4 == 1)]
    last = {"role": "user", "content": "and the last question?"}
    messages = [system, *history, last]
    fitted = fit(Conversation(tokenizer, messages), WINDOW, RESERVE)
    assert fitted.dropped_messages > 0 and fitted.dropped_tools == 0
    assert len(fitted.prompt_ids) <= WINDOW - RESERVE
    kept = history[fitted.dropped_messages:]
    assert kept[0]["role"] == "user"  # whole exchanges: a cut never falls inside one
    assert fitted.prompt_ids == tokenizer.chat_ids([system, *kept, last])
    # As much history as fits is kept: one more exchange would not have fitted.
    previous = history[:fitted.dropped_messages]
    start = max(i for i, m in enumerate(previous) if m["role"] == "user")
    assert len(tokenizer.chat_ids([system, *previous[start:], *kept, last])) > WINDOW - RESERVE


def test_a_tool_result_never_loses_its_call(tokenizer):
    history = [m for i in range(40) for m in exchange(i, words=12, tool=True)]
    messages = [*history, {"role": "user", "content": "now?"}]
    fitted = fit(Conversation(tokenizer, messages), WINDOW, RESERVE)
    text = tokenizer.decode(fitted.prompt_ids)
    assert fitted.dropped_messages and text.count("<tool_call>") == text.count("<tool_response>") > 0


def test_tools_go_before_history_only_when_they_must(tokenizer):
    # A short history and many tools: the tools cannot fit even alone, so they go, and the history stays.
    history = exchange(0) + exchange(1)
    messages = [*history, {"role": "user", "content": "third"}]
    fitted = fit(Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS), WINDOW, RESERVE)
    assert (fitted.dropped_tools, fitted.dropped_messages) == (36, 0)
    # A few small tools and a long history: the history goes, the tools stay.
    long_history = [m for i in range(30) for m in exchange(i, words=15)]
    fitted = fit(Conversation(tokenizer, [*long_history, {"role": "user", "content": "x"}], OPEN_WEBUI_TOOLS[:2]),
                 WINDOW, RESERVE)
    assert fitted.dropped_tools == 0 and fitted.dropped_messages > 0


def test_the_reserve_is_the_smaller_of_the_setting_and_max_tokens(tokenizer):
    history = [m for i in range(30) for m in exchange(i, words=15)]
    messages = [*history, {"role": "user", "content": "x"}]
    roomy = fit(Conversation(tokenizer, messages), WINDOW, RESERVE)
    tight = fit(Conversation(tokenizer, messages), WINDOW, 16)
    assert len(roomy.prompt_ids) <= WINDOW - RESERVE < len(tight.prompt_ids) <= WINDOW - 16


def test_when_the_last_turn_alone_cannot_fit_the_error_names_the_parts(tokenizer):
    messages = [{"role": "system", "content": "Rules. " * 40}, *exchange(0),
                {"role": "user", "content": "7" * 1100}]
    with pytest.raises(APIError) as caught:
        fit(Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS), WINDOW, RESERVE)
    error = caught.value
    assert error.status == 400 and error.code == "context_length_exceeded" and error.param == "messages"
    conversation = Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS)
    system = conversation.head_tokens([])
    tools = conversation.head_tokens(OPEN_WEBUI_TOOLS) - system
    last = conversation.groups[-1].tokens
    assert error.message.startswith("This model's maximum context length is 1024 tokens. However, your messages "
                                    f"resulted in {len(tokenizer.chat_ids(messages, OPEN_WEBUI_TOOLS))} tokens")
    assert f"system {system:,} tokens" in error.message
    assert f"36 tool definitions {tools:,} tokens" in error.message
    assert "2 earlier messages" in error.message and f"last message {last:,} tokens" in error.message


def test_overflow_error_leaves_nothing_out(tokenizer):
    messages = [{"role": "user", "content": "hello"}]
    with pytest.raises(APIError) as caught:
        fit(Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS), WINDOW, RESERVE, overflow="error")
    assert "36 tool definitions" in caught.value.message and "nothing is left out" in caught.value.message
    # ...but a prompt that fits the window, even without the reserve, goes as it is.
    history = [m for i in range(16) for m in exchange(i, words=15)]
    messages = [*history, {"role": "user", "content": "x"}]
    assert WINDOW - RESERVE < len(tokenizer.chat_ids(messages)) <= WINDOW
    assert fit(Conversation(tokenizer, messages), WINDOW, RESERVE, overflow="error").prompt_ids == \
        tokenizer.chat_ids(messages)


def test_a_long_conversation_is_counted_only_as_far_as_the_window_reaches(tokenizer):
    # The cost of fitting is bounded by the window, not by the conversation: 5,000 exchanges, few counted.
    messages = [m for i in range(5000) for m in exchange(i, words=5)] + [{"role": "user", "content": "hello"}]
    conversation = Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS * 20)
    fitted = fit(conversation, WINDOW, RESERVE)
    counted = [g for g in conversation.groups if g._tokens is not None]
    assert len(conversation.groups) == 5001 and len(counted) < 80
    assert fitted.prompt_ids == tokenizer.chat_ids(messages[-len(messages) + fitted.dropped_messages:])
    assert len(fitted.prompt_ids) <= WINDOW - RESERVE


def test_what_cannot_fit_is_refused_before_any_tool_is_weighed(tokenizer, monkeypatch):
    # Weighing tools costs time that grows with the words of the system turn and the last message: a request
    # whose fixed part alone overflows the window (a 1 MiB body can) must not pay it, let alone for a 400.
    def weighed(*args, **kwargs):
        raise AssertionError("tools were weighed for a request that cannot fit")

    monkeypatch.setattr("app.window.select", weighed)
    system = "\n".join(f"- Item {i}: word{i} other{i}" for i in range(400))
    question = " ".join(f"word{i}" for i in range(400))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    with pytest.raises(APIError) as caught:
        fit(Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS), WINDOW, RESERVE)
    assert caught.value.code == "context_length_exceeded"
