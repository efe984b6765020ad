"""Which tool definitions stay when they do not all fit (app/tool_selection.py, through app/window.py), against the
real tokenizer and template, with Home Assistant's Assist tools (tests/helpers/home_assistant.py) and Open
WebUI's 36 built-in tools (tests/fixtures/open_webui_tools.json)."""
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from app.tool_selection import COMPACT, MINIMAL, Relevance, render, tool_json, words
from app.window import Conversation, fit
from tests.helpers import PROJECT_DIR
from tests.helpers.home_assistant import HOME_17, assist_request, home, tool_result_request

OPEN_WEBUI_TOOLS = json.loads((PROJECT_DIR / "tests" / "fixtures" / "open_webui_tools.json").read_text())
WINDOW, RESERVE, TOOL_RESERVE = 1024, 256, 80

# What people say to Home Assistant's Assist, and the intent that does it (a home of 17 entities, 24 tools).
ASSIST_COMMANDS = [
    ("turn on the kitchen light", "HassTurnOn"), ("switch off the hall light", "HassTurnOff"),
    ("turn off the bedroom fan", "HassTurnOff"), ("set the thermostat to 21 degrees", "HassClimateSetTemperature"),
    ("pause the TV", "HassMediaPause"), ("resume the TV", "HassMediaUnpause"), ("next song", "HassMediaNext"),
    ("mute the TV", "HassMediaPlayerMute"), ("set the TV volume to 20", "HassSetVolume"),
    ("add milk to the shopping list", "HassListAddItem"), ("what's on my shopping list?", "todo_get_items"),
    ("what time is it?", "GetDateTime"), ("what's the date today?", "GetDateTime"),
    ("is the front door locked?", "GetLiveContext"), ("what is the temperature outside?", "GetLiveContext"),
    ("lock the front door", "HassTurnOn"), ("unlock the front door", "HassTurnOff"),
    ("open the garage door", "HassTurnOn"), ("close the garage door", "HassTurnOff"),
    ("stop the garage door", "HassStopMoving"), ("dim the living room lamp to 30%", "HassLightSet"),
    ("start the vacuum", "HassVacuumStart"), ("send the vacuum back to its dock", "HassVacuumReturnToBase"),
    ("set the fan speed to 50%", "HassFanSetSpeed"), ("play some jazz in the living room", "HassMediaSearchAndPlay"),
    ("activate movie night", "HassTurnOn"), ("turn on the coffee maker", "HassTurnOn"),
    ("mark milk as done on the shopping list", "HassListCompleteItem"), ("cancel all timers", "HassCancelAllTimers"),
    ("turn off all the lights in the living room", "HassTurnOff"),
]
# What people ask Open WebUI with its built-in tools on, and the tool that answers it.
OPEN_WEBUI_QUESTIONS = [
    ("what time is it?", "get_current_timestamp"), ("what date will it be in three days?", "calculate_timestamp"),
    ("remember that I like green tea", "add_memory"), ("what do you remember about me?", "search_memories"),
    ("forget my old address", "delete_memory"), ("find my notes about the garden", "search_notes"),
    ("write a note titled groceries", "write_note"),
    ("add a meeting to my calendar tomorrow at 3", "create_calendar_event"),
    ("what's on my calendar next week?", "search_calendar_events"),
    ("search my knowledge base for the vacation policy", "query_knowledge_base"),
    ("find the chat where we talked about Python", "search_chats"),
    ("create a task list for moving house", "create_tasks"), ("run my morning automation", "run_automation"),
]


def ha_fit(tokenizer, body):
    messages = [{"role": m["role"], "content": m.get("content", ""), "tool_calls": m.get("tool_calls")}
                for m in body["messages"]]
    return fit(Conversation(tokenizer, messages, body["tools"]), WINDOW, RESERVE, "truncate", TOOL_RESERVE)


def test_words_split_names_and_ignore_filler():
    assert words("HassTurnOn") == {"hass", "turn", "on"}
    assert words("get_current_timestamp") == {"get", "current", "timestamp"}
    assert words("What can you do for me?") == set()
    assert words("Turn off the lights and switches") == {"turn", "off", "light", "switch"}


def test_turn_on_the_kitchen_light_keeps_hassturnon_with_17_entities(tokenizer):
    body = assist_request(HOME_17, "turn on the kitchen light")
    fitted = ha_fit(tokenizer, body)
    assert fitted.kept_tools == ["HassTurnOn"] and fitted.dropped_tools == 23 and fitted.unfit_tool is None
    # Exactly what the template renders for the conversation with that one tool, leaving the call its room.
    turn_on = next(t for t in body["tools"] if t["function"]["name"] == "HassTurnOn")
    assert fitted.prompt_ids == tokenizer.chat_ids(body["messages"], [turn_on])
    assert len(fitted.prompt_ids) + TOOL_RESERVE <= WINDOW


def test_the_rule_finds_the_intent_for_most_assist_commands(tokenizer):
    body = assist_request(HOME_17, "")
    relevance, names = Relevance(body["tools"]), [t["function"]["name"] for t in body["tools"]]
    context = [body["messages"][0]["content"]]
    best = [names[relevance.candidates(text, context)[0]] if relevance.candidates(text, context) else None
            for text, _ in ASSIST_COMMANDS]
    right = sum(found == want for found, (_, want) in zip(best, ASSIST_COMMANDS, strict=True))
    assert right >= 25, list(zip(best, ASSIST_COMMANDS, strict=True))  # 25 of 30 when measured; 23 without the overview
    # And where the window leaves room for it, the intent is among the tools kept.
    kept = sum(want in ha_fit(tokenizer, assist_request(HOME_17, text)).kept_tools for text, want in ASSIST_COMMANDS)
    assert kept >= 26


def test_the_home_overview_tells_what_a_name_is(tokenizer):
    # "Thermostat" is not in any tool; the system prompt's overview says it is a climate device.
    body = assist_request(HOME_17, "")
    relevance, names = Relevance(body["tools"]), [t["function"]["name"] for t in body["tools"]]
    text = "set the thermostat to 21 degrees"
    assert names[relevance.candidates(text, [body["messages"][0]["content"]])[0]] == "HassClimateSetTemperature"
    assert names[relevance.candidates(text)[0]] != "HassClimateSetTemperature"


def test_open_webui_questions_keep_their_tool_and_little_else(tokenizer):
    for text, want in OPEN_WEBUI_QUESTIONS:
        messages = [{"role": "user", "content": text}]
        fitted = fit(Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS), WINDOW, RESERVE, "truncate", TOOL_RESERVE)
        assert want in fitted.kept_tools, (text, fitted.kept_tools)
        assert len(fitted.kept_tools) <= 6  # a tool costs ~100 tokens, ~7 s of card time: only those asked for
    # "what time is it?" keeps the timestamp tools only.
    fitted = fit(Conversation(tokenizer, [{"role": "user", "content": "What time is it?"}], OPEN_WEBUI_TOOLS),
                 WINDOW, RESERVE, "truncate", TOOL_RESERVE)
    assert fitted.kept_tools == ["get_current_timestamp", "calculate_timestamp"]


@pytest.mark.parametrize("text", ["Hi, how are you?", "What can you do?", "tell me a joke"])
def test_a_message_that_asks_for_no_tool_keeps_none(tokenizer, text):
    for tools in (OPEN_WEBUI_TOOLS, assist_request(HOME_17, "")["tools"]):
        fitted = fit(Conversation(tokenizer, [{"role": "user", "content": text}], tools), WINDOW, RESERVE)
        assert fitted.kept_tools == [] and fitted.unfit_tool is None
        assert fitted.prompt_ids == tokenizer.chat_ids([{"role": "user", "content": text}])


def test_renderings_keep_names_types_and_drop_notes():
    tool = {"type": "function", "function": {
        "name": "set_alarm", "description": "Set an alarm. It rings at the given time.\nMore words here.",
        "parameters": {"type": "object", "title": "Alarm", "$schema": "x", "required": ["time"], "properties": {
            "time": {"type": "string", "description": "HH:MM", "examples": ["07:00"]},
            "days": {"type": "array", "items": {"type": "string", "enum": list("1234567890")}},
            "description": {"type": "string", "description": "a note", "default": ""},
            "tone": {"type": "string", "enum": ["beep", "chime"], "description": "the sound"}}}}}
    assert render(tool, None) is tool
    compact = render(tool, COMPACT)["function"]
    assert compact["description"] == "Set an alarm."
    assert compact["parameters"] == {"type": "object", "required": ["time"], "properties": {
        "time": {"type": "string"}, "days": {"type": "array", "items": {"type": "string", "enum": list("1234567890")}},
        "description": {"type": "string"}, "tone": {"type": "string", "enum": ["beep", "chime"]}}}
    minimal = render(tool, MINIMAL)["function"]
    assert minimal["parameters"] == {"type": "object", "properties": {
        "time": {"type": "string"}, "days": {"type": "array", "items": {"type": "string"}},
        "description": {"type": "string"}, "tone": {"type": "string", "enum": ["beep", "chime"]}}, "required": ["time"]}
    assert len(tool_json(render(tool, MINIMAL))) < len(tool_json(render(tool, COMPACT))) < len(tool_json(tool))


@pytest.mark.parametrize("entities, level", [(18, COMPACT), (20, MINIMAL)])
def test_where_the_best_tool_only_fits_compacted_it_is_compacted(tokenizer, entities, level):
    body = assist_request(home(entities), "turn on the kitchen light")
    fitted = ha_fit(tokenizer, body)
    assert fitted.kept_tools == ["HassTurnOn"] and fitted.compacted_tools == 1
    turn_on = next(t for t in body["tools"] if t["function"]["name"] == "HassTurnOn")
    rendered = tokenizer.decode(fitted.prompt_ids)
    assert tool_json(render(turn_on, level)) in rendered and tool_json(turn_on) not in rendered


def test_when_the_needed_tool_cannot_fit_the_request_is_explained_not_pretended(tokenizer):
    fitted = ha_fit(tokenizer, assist_request(home(30), "turn on the kitchen light"))
    assert fitted.kept_tools == [] and fitted.unfit_tool == "HassTurnOn"
    assert "needs the tool HassTurnOn" in fitted.unfit_reason and "expose fewer entities" in fitted.unfit_reason
    # A lesser tool that would fit is not offered instead (the model would do the wrong thing).
    assert "<tools>" not in tokenizer.decode(fitted.prompt_ids)


def test_after_the_tools_answered_no_tool_is_needed(tokenizer):
    # The follow-up carries the call and its result: if the called tool no longer fits, the model answers from the
    # result without tools (no explanation: the action was done).
    body = tool_result_request(HOME_17, "turn on the kitchen light",
                               {"name": "HassTurnOn", "arguments": {"name": "Kitchen Light", "domain": ["light"]}},
                               None)
    fitted = ha_fit(tokenizer, body)
    assert fitted.unfit_tool is None
    assert fitted.kept_tools in ([], ["HassTurnOn"])  # the tool it called, or none: never another one


def test_tool_choice_keeps_only_the_named_tool(tokenizer):
    messages = [{"role": "user", "content": "Note this down"}]
    fitted = fit(Conversation(tokenizer, messages, OPEN_WEBUI_TOOLS, keep_tool="write_note"), WINDOW, RESERVE)
    assert fitted.kept_tools == ["write_note"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entities=st.integers(0, 36), command=st.sampled_from([text for text, _ in ASSIST_COMMANDS]))
def test_the_kept_prompt_is_exactly_counted_and_fits(tokenizer, entities, command):
    body = assist_request(home(entities), command)
    fitted = ha_fit(tokenizer, body)
    if fitted.kept_tools:
        # The selection counted each tool's line on its own: the sum is exactly the rendered prompt.
        kept = [t for t in body["tools"] if t["function"]["name"] in fitted.kept_tools]
        assert len(fitted.prompt_ids) <= WINDOW - TOOL_RESERVE
        assert len(fitted.prompt_ids) == len(tokenizer.chat_ids(body["messages"], [
            next(render(t, level) for level in (None, COMPACT, MINIMAL)
                 if tool_json(render(t, level)) in tokenizer.decode(fitted.prompt_ids)) for t in kept]))
    elif fitted.kept_tools is None:
        assert len(fitted.prompt_ids) + RESERVE <= WINDOW  # everything fitted as sent
