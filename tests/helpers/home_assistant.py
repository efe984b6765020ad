"""Home Assistant's `POST /api/chat` bodies, as its Ollama integration sends them: for tests of our Ollama API.

Standard library only. Nothing here is copied code: it is a generator written to reproduce the shapes that
Home Assistant core 2026.2.3 builds and that the `ollama` Python client 0.5.1 (the version HA 2026.2.3 pins
in `homeassistant/components/ollama/manifest.json`) serializes. Read for it, all at release 2026.2.3 (the
`homeassistant-2026.2.3` wheel from PyPI, which is the tagged source), plus `ollama-0.5.1` and
`voluptuous-openapi-0.2.0` (the version HA 2026.2.3 pins in `homeassistant/package_constraints.txt`):

- `homeassistant/components/ollama/entity.py` `OllamaBaseLLMEntity._async_handle_chat_log`: the call
  `client.chat(model=, messages=, tools=, stream=True, keep_alive=f"{keep_alive}s",
  options={"num_ctx": num_ctx}, think=settings.get("think"), format=None)`; `_format_tool` (a tool is
  `{"type": "function", "function": {"name", "parameters": voluptuous_openapi.convert(schema,
  custom_serializer=llm.selector_serializer), "description"}}`); `_convert_content` (a tool result is a
  `tool` message whose content is `helpers.json.json_dumps(tool_result)`: orjson, compact; an assistant
  turn carries `tool_calls=[{"function": {"name", "arguments"}}]`); `_parse_tool_args` (drops None/"").
- `homeassistant/components/ollama/const.py` / `config_flow.py`: defaults num_ctx 8192, keep_alive -1 (s),
  max_history 20, think False, model "qwen3:4b-instruct"; the form stores numbers as floats, hence
  `"num_ctx": 8192.0` and `"keep_alive": "-1.0s"`, and the boolean think toggle as `false`.
- `homeassistant/components/conversation/chat_log.py` `ChatLog.async_provide_llm_data`: the system prompt
  is `"\\n".join([instructions, api_prompt, (date/time prompt only when no GetDateTime tool), extra])`; the
  instructions default to `llm.DEFAULT_INSTRUCTIONS_PROMPT` (a static template, so its trailing newline is
  kept; a rendered template is `.strip()`ped, see `helpers/template/__init__.py`).
- `homeassistant/helpers/llm.py` `AssistAPI`: `_async_get_api_prompt` (NO_ENTITIES_PROMPT with no exposed
  entity; else the control preamble, the "ask which area" line (no satellite device), "This device is not
  able to start timers.", DYNAMIC_CONTEXT_PROMPT, "Static Context: ..." and the YAML overview from
  `_get_exposed_entities(include_state=False)`: per entity `names` (name + aliases), `domain`, `areas`,
  sorted by name; scripts and calendars are split out of it), `_async_get_tools` (intents minus
  IGNORE_INTENTS and the timer intents, kept when `platforms is None` or it meets an exposed domain;
  then GetDateTime; calendar_get_events / todo_get_items / one tool per exposed script; GetLiveContext when
  any domain is exposed), `IntentTool` (drops `preferred_area_id` / `preferred_floor_id`),
  `IntentResponseDict` (intent response `as_dict()` minus `language` and `card`).
  YAML is `annotatedyaml.dump` = `yaml.dump(..., default_flow_style=False, allow_unicode=True,
  sort_keys=False)`.
- `homeassistant/helpers/intent.py` `DynamicServiceIntentHandler.slot_schema` (name/area/floor, domain,
  device_class flattened from the enum classes, then required and optional slots with their
  descriptions), `IntentResponse.as_dict`; `homeassistant/components/intent/__init__.py` (HassTurnOn,
  HassTurnOff and their ONOFF_DEVICE_CLASSES, HassSetPosition, HassStopMoving), `intent/timers.py`
  (HassCancelAllTimers: platforms None, so offered even with no entity), and the `intent.py` of light,
  climate, cover, fan, media_player, todo, vacuum, humidifier, lawn_mower (slot schemas, `platforms`).
- `voluptuous_openapi/__init__.py` 0.2.0 `convert`: a `vol.Any("name", "area", "floor")` key gives three
  properties; a function validator becomes the JSON type of its first parameter's annotation (`cv.string`,
  `non_empty_string` -> string; `cv.ensure_list` -> nothing, so `vol.All(ensure_list, [x])` is an array);
  `vol.Coerce(int)` + `vol.Range` -> integer with minimum/maximum; `vol.In` -> enum; `vol.Any` of literals
  and a range -> `anyOf`; `vol.Required(...)` keys go to `required` (the Any key does not).
- `ollama/_client.py` 0.5.1 `AsyncClient.chat`: the body is `ChatRequest(...).model_dump(exclude_none=True)`;
  `_copy_messages` drops every falsy message field (so an empty assistant content is absent); `_copy_tools`
  turns `tools=None` into `[]` (sent as `"tools": []`). `ollama/_types.py`: pydantic models decide the
  keys and their order: body `model, stream, options, keep_alive, messages, tools, think` (`format` None is
  omitted); tool `type, function{name, description, parameters{type, required, properties}}`; a property
  keeps only `type, items, description, enum` (so `minimum`, `maximum`, `default` and `anyOf` are dropped:
  HassSetVolumeRelative's `volume_step` is sent as `{}`); `options` is a plain mapping, so 8192.0 stays a
  float.

Checked: for home(0) to home(60), the plain body and the follow-up, the output here equals, key order
included, what the real voluptuous 0.15.2 + voluptuous-openapi 0.2.0 + PyYAML + ollama 0.5.1
`ChatRequest.model_dump` make of HA's schemas rebuilt with stand-ins of the same signatures. Counted with
the Qwen2.5 tokenizer (system turn alone / what the tools add to it, template preamble included), the
fixtures give 58/612 (0 entities, 4 tools), 372/889 (1 light, 6), 636/3185 (17, 24), 1015/3185 (37, 24),
HassTurnOn alone 294: the numbers measured with the real HA 2026.2.3. `python home_assistant.py [folder]`
rewrites tests/fixtures/home_assistant/.

What is approximated:
- Tool order. Intents are offered in registration order; the intent component registers HassTurnOn,
  HassTurnOff, HassSetPosition, HassStopMoving, HassCancelAllTimers, and each domain's intents arrive when
  that domain loads, an order that depends on the installation. Here: the intent component's first, then
  light, climate, media_player, cover (none of its own: its HassOpenCover/HassCloseCover are ignored), fan,
  todo, vacuum, humidifier, lawn_mower.
- Enum order where HA builds it from a set: the device classes of HassTurnOn/HassTurnOff (a set of enum
  classes) are listed here button, cover, valve, switch, media_player; HA's order varies between runs.
- The date and time of the plain prompt are fixed (FIXED_DATE, FIXED_TIME); with Control Home Assistant
  on, HA 2026.2 puts no date in the prompt (the GetDateTime tool replaces it).
- The home is made up (names, areas); only entities of plain ASCII names are supported by the small YAML
  writer here, which follows PyYAML's choice between plain and quoted scalars for such names.
- A browser Assist dialog (no satellite device) is assumed: with a voice satellite HA adds an area line and
  may offer the timer intents.
"""
import json
import re

HA_VERSION = "2026.2.3"
OLLAMA_CLIENT_VERSION = "0.5.1"
VOLUPTUOUS_OPENAPI_VERSION = "0.2.0"

DEFAULT_MODEL = "qwen2.5:latest"
NUM_CTX = 8192.0            # the subentry form stores numbers as floats
KEEP_ALIVE = "-1.0s"        # f"{-1.0}s"
THINK = False               # the "Think before responding" toggle, off
FIXED_DATE = "2026-02-20"
FIXED_TIME = "18:30:00"

# -- the prompt pieces (homeassistant/helpers/llm.py) ------------------------------------------------------------
INSTRUCTIONS_PROMPT = (
    "You are a voice assistant for Home Assistant.\n"
    "Answer questions about the world truthfully.\n"
    "Answer in plain text. Keep it simple and to the point.\n")
NO_ENTITIES_PROMPT = ("Only if the user wants to control a device, tell them to expose entities to their voice "
                      "assistant in Home Assistant.")
CONTROL_PROMPT = (
    "When controlling Home Assistant always call the intent tools. "
    "Use HassTurnOn to lock and HassTurnOff to unlock a lock. "
    "When controlling a device, prefer passing just name and domain. "
    "When controlling an area, prefer passing just area name and domain.")
NO_AREA_PROMPT = ("When a user asks to turn on all devices of a specific type, ask user to specify an area, "
                  "unless there is only one device of that type.")
NO_TIMERS_PROMPT = "This device is not able to start timers."
LIVE_CONTEXT_PROMPT = (
    "You ARE equipped to answer questions about the current state of\n"
    "the home using the `GetLiveContext` tool. This is a primary function. Do not state you lack the\n"
    "functionality if the question requires live data.\n"
    'If the user asks about device existence/type (e.g., "Do I have lights in the bedroom?"): Answer\n'
    "from the static context below.\n"
    'If the user asks about the CURRENT state, value, or mode (e.g., "Is the lock locked?",\n'
    '"Is the fan on?", "What mode is the thermostat in?", "What is the temperature outside?"):\n'
    "    1.  Recognize this requires live data.\n"
    "    2.  You MUST call `GetLiveContext`. This tool will provide the needed real-time information (like "
    "temperature from the local weather, lock status, etc.).\n"
    "    3.  Use the tool's response** to answer the user accurately (e.g., \"The temperature outside is "
    "[value from tool].\").\n"
    "For general knowledge questions not about the home: Answer truthfully from internal knowledge.\n")
STATIC_CONTEXT_HEADER = "Static Context: An overview of the areas and the devices in this smart home:"


def date_time_prompt(date=FIXED_DATE, time=FIXED_TIME):
    """DATE_TIME_PROMPT rendered (a template, so stripped of its final newline)."""
    return f"Current time is {time}. Today's date is {date}."


# -- the home ------------------------------------------------------------------------------------------------------
class Entity:
    """An exposed entity: id, friendly name, area (or None) and aliases."""

    def __init__(self, entity_id, name, area=None, aliases=()):
        self.entity_id = entity_id
        self.name = name
        self.area = area
        self.aliases = tuple(aliases)

    @property
    def domain(self):
        return self.entity_id.split(".", 1)[0]

    def __repr__(self):
        return f"Entity({self.entity_id!r}, {self.name!r}, {self.area!r})"


def _e(entity_id, name, area=None, *aliases):
    return Entity(entity_id, name, area, aliases)


# The first 17 are HOME_17 (11 domains, 24 tools); up to 37 no domain that brings a tool is added, so home(37)
# still has 24 tools; past that come humidifier, valve, lawn_mower, weather, binary_sensor, button...
HOME = (
    _e("light.kitchen_light", "Kitchen Light", "Kitchen"),
    _e("climate.thermostat", "Thermostat", "Hallway"),
    _e("media_player.living_room_tv", "Living Room TV", "Living Room"),
    _e("cover.garage_door", "Garage Door", "Garage"),
    _e("lock.front_door", "Front Door", "Hallway"),
    _e("fan.bedroom_fan", "Bedroom Fan", "Bedroom"),
    _e("switch.coffee_maker", "Coffee Maker", "Kitchen"),
    _e("sensor.outdoor_temperature", "Outdoor Temperature", "Garden"),
    _e("todo.shopping_list", "Shopping List"),
    _e("vacuum.robot_vacuum", "Robot Vacuum", "Living Room"),
    _e("scene.movie_night", "Movie Night", "Living Room"),
    _e("light.living_room_lamp", "Living Room Lamp", "Living Room"),
    _e("light.bedroom_light", "Bedroom Light", "Bedroom"),
    _e("sensor.living_room_humidity", "Living Room Humidity", "Living Room"),
    _e("switch.garden_lights", "Garden Lights", "Garden"),
    _e("sensor.kitchen_temperature", "Kitchen Temperature", "Kitchen"),
    _e("light.hall_light", "Hall Light", "Hallway"),
    # 18..37
    _e("light.office_desk_lamp", "Office Desk Lamp", "Office", "Desk Lamp"),
    _e("media_player.kitchen_speaker", "Kitchen Speaker", "Kitchen", "Kitchen Radio"),
    _e("cover.living_room_blinds", "Living Room Blinds", "Living Room", "Lounge Blinds"),
    _e("lock.back_door", "Back Door Lock", "Kitchen", "Back Door"),
    _e("sensor.bedroom_temperature", "Bedroom Temperature", "Bedroom"),
    _e("switch.dishwasher", "Dishwasher", "Kitchen"),
    _e("light.bathroom_light", "Bathroom Light", "Bathroom"),
    _e("fan.bathroom_fan", "Bathroom Fan", "Bathroom", "Extractor Fan"),
    _e("sensor.power_consumption", "Power Consumption", "Utility Room", "Energy Meter"),
    _e("light.porch_light", "Porch Light", "Porch", "Front Porch Light"),
    _e("cover.bedroom_curtains", "Bedroom Curtains", "Bedroom"),
    _e("sensor.office_humidity", "Office Humidity", "Office"),
    _e("climate.bedroom_heater", "Bedroom Heater", "Bedroom", "Bedroom Radiator"),
    _e("switch.washing_machine", "Washing Machine", "Utility Room", "Washer"),
    _e("light.dining_room_light", "Dining Room Light", "Dining Room", "Chandelier"),
    _e("media_player.bedroom_speaker", "Bedroom Speaker", "Bedroom", "Bedroom Sonos"),
    _e("sensor.garage_temperature", "Garage Temperature", "Garage"),
    _e("light.garage_ceiling_light", "Garage Ceiling Light", "Garage"),
    _e("switch.office_heater", "Office Heater", "Office"),
    _e("light.kids_room_light", "Kids Room Light", "Kids Room", "Nursery Light"),
    # 38..60
    _e("binary_sensor.front_door_contact", "Front Door Contact", "Hallway"),
    _e("humidifier.bedroom_humidifier", "Bedroom Humidifier", "Bedroom"),
    _e("sensor.washing_machine_power", "Washing Machine Power", "Utility Room"),
    _e("light.stairs_light", "Stairs Light", "Hallway"),
    _e("binary_sensor.hallway_motion", "Hallway Motion", "Hallway"),
    _e("valve.garden_sprinkler", "Garden Sprinkler", "Garden"),
    _e("light.living_room_ceiling", "Living Room Ceiling", "Living Room"),
    _e("lawn_mower.lawn_mower", "Lawn Mower", "Garden"),
    _e("sensor.outdoor_humidity", "Outdoor Humidity", "Garden"),
    _e("weather.home", "Home"),
    _e("switch.christmas_tree", "Christmas Tree", "Living Room"),
    _e("binary_sensor.garage_door_contact", "Garage Door Contact", "Garage"),
    _e("light.bedside_lamp", "Bedside Lamp", "Bedroom"),
    _e("cover.office_blinds", "Office Blinds", "Office"),
    _e("sensor.kids_room_temperature", "Kids Room Temperature", "Kids Room"),
    _e("media_player.office_speaker", "Office Speaker", "Office"),
    _e("button.doorbell_chime", "Doorbell Chime", "Hallway"),
    _e("light.terrace_lights", "Terrace Lights", "Garden"),
    _e("fan.office_fan", "Office Fan", "Office"),
    _e("sensor.solar_production", "Solar Production"),
    _e("switch.guest_mode", "Guest Mode"),
    _e("binary_sensor.smoke_detector", "Smoke Detector", "Kitchen"),
    _e("light.bathroom_mirror", "Bathroom Mirror", "Bathroom"),
)
HOME_17 = list(HOME[:17])


def home(n):
    """The first n entities of the made-up home (0 <= n <= len(HOME)); home(1) is one light."""
    if not 0 <= n <= len(HOME):
        raise ValueError(f"a home has 0 to {len(HOME)} entities")
    return list(HOME[:n])


# -- the entity overview: a YAML list as PyYAML writes it ----------------------------------------------------------
_PLAIN_OK = re.compile(r"^[A-Za-z][A-Za-z0-9 ()'.,_-]*$")
_YAML_WORDS = {"y", "yes", "n", "no", "true", "false", "on", "off", "null"}


def _yaml_scalar(text):
    """A string as PyYAML writes it; only the simple names used here are supported."""
    if not _PLAIN_OK.match(text) or text.endswith(" ") or len(text) > 60:
        raise ValueError(f"name {text!r} is outside what this YAML writer reproduces")
    if text.lower() in _YAML_WORDS or ": " in text or " #" in text:
        return "'" + text.replace("'", "''") + "'"
    return text


def _overview_entries(entities):
    """The `entities` part of llm._get_exposed_entities(include_state=False): sorted by name, scripts and
    calendars left out."""
    entries = []
    for entity in sorted(entities, key=lambda e: e.name):
        if entity.domain in ("script", "calendar"):
            continue
        entry = {"names": ", ".join((entity.name, *entity.aliases)), "domain": entity.domain}
        if entity.area:
            entry["areas"] = entity.area
        entries.append(entry)
    return entries


def entity_overview(entities):
    """The YAML block of the static context."""
    lines = []
    for entry in _overview_entries(entities):
        first = True
        for key, value in entry.items():
            lines.append(("- " if first else "  ") + f"{key}: {_yaml_scalar(value)}")
            first = False
    return "".join(line + "\n" for line in lines)


# -- the system prompts -------------------------------------------------------------------------------------------
def assist_system_prompt(entities):
    """The system message content with Control Home Assistant (the Assist API) on."""
    if not _overview_entries(entities):
        api_prompt = NO_ENTITIES_PROMPT
    else:
        api_prompt = "\n".join([CONTROL_PROMPT, NO_AREA_PROMPT, NO_TIMERS_PROMPT, LIVE_CONTEXT_PROMPT,
                                STATIC_CONTEXT_HEADER, entity_overview(entities)])
    # GetDateTime is always among the tools, so no date/time line.
    return "\n".join([INSTRUCTIONS_PROMPT, api_prompt])


def plain_system_prompt():
    """The system message content without an LLM API: instructions, then the date and time."""
    return "\n".join([INSTRUCTIONS_PROMPT, date_time_prompt()])


# -- the tools, as the ollama client sends them -------------------------------------------------------------------
def _string():
    return {"type": "string"}


def _prop(type_=None, items=None, description=None, enum=None):
    """A property as ollama's Tool.Function.Parameters.Property keeps it: type, items, description, enum."""
    prop = {}
    for key, value in (("type", type_), ("items", items), ("description", description), ("enum", enum)):
        if value is not None:
            prop[key] = value
    return prop


def _tool(name, description, properties=None, required=()):
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "required": list(required), "properties": dict(properties or {})}}}


BUTTON_CLASSES = ["identify", "restart", "update"]
COVER_CLASSES = ["awning", "blind", "curtain", "damper", "door", "garage", "gate", "shade", "shutter", "window"]
VALVE_CLASSES = ["water", "gas"]
SWITCH_CLASSES = ["outlet", "switch"]
MEDIA_PLAYER_CLASSES = ["tv", "speaker", "receiver"]
ONOFF_CLASSES = BUTTON_CLASSES + COVER_CLASSES + VALVE_CLASSES + SWITCH_CLASSES + MEDIA_PLAYER_CLASSES
MEDIA_CLASSES = ["album", "app", "artist", "channel", "composer", "contributing_artist", "directory", "episode",
                 "game", "genre", "image", "movie", "music", "playlist", "podcast", "season", "track", "tv_show",
                 "url", "video"]


def _service_intent(name, description, domains=None, device_classes=None, required=(), optional=()):
    """A DynamicServiceIntentHandler's tool: name/area/floor, domain, device_class, then its own slots
    (each (slot, property)); only the required slots are listed as required."""
    domain_items = _prop("string", enum=list(domains)) if domains else _string()
    props = {"name": _string(), "area": _string(), "floor": _string(),
             "domain": _prop("array", items=domain_items)}
    if device_classes:
        props["device_class"] = _prop("array", items=_prop("string", enum=list(device_classes)))
    props.update(required)
    props.update(optional)
    return _tool(name, description, props, [slot for slot, _ in required])


def _core_intents():
    return [
        _service_intent("HassTurnOn", "Turns on/opens/presses a device or entity. For locks, this performs a "
                        "'lock' action. Use for requests like 'turn on', 'activate', 'enable', or 'lock'.",
                        device_classes=ONOFF_CLASSES),
        _service_intent("HassTurnOff", "Turns off/closes a device or entity. For locks, this performs an "
                        "'unlock' action. Use for requests like 'turn off', 'deactivate', 'disable', or 'unlock'.",
                        device_classes=ONOFF_CLASSES),
    ]


def _position_intents():
    classes = COVER_CLASSES + VALVE_CLASSES
    return [
        _service_intent("HassSetPosition", "Sets the position of a device or entity", device_classes=classes,
                        required=[("position", _prop("integer"))]),
        _service_intent("HassStopMoving", "Stops a moving device or entity", device_classes=classes),
    ]


def _cancel_all_timers():
    return _tool("HassCancelAllTimers", "Cancels all timers", {"area": _string()})


def _light_intents():
    return [_service_intent("HassLightSet", "Sets the brightness percentage or color of a light", optional=[
        ("color", _string()), ("temperature", _prop("integer")),
        ("brightness", _prop("integer", description="The brightness percentage of the light between 0 and 100, "
                                                     "where 0 is off and 100 is fully lit"))])]


def _climate_intents():
    return [_tool("HassClimateSetTemperature", "Sets the target temperature of a climate device or entity",
                  {"temperature": _prop("number"), "area": _string(), "name": _string(), "floor": _string()},
                  ["temperature"])]


def _media_player_intents():
    media = dict(domains=["media_player"], device_classes=MEDIA_PLAYER_CLASSES)
    # vol.Boolean() is an unannotated function to voluptuous_openapi, hence "string".
    mute = ("is_volume_muted", _prop("string", description="Whether the media player should be muted or unmuted"))
    return [
        _service_intent("HassMediaUnpause", "Resumes a media player", **media),
        _service_intent("HassMediaPause", "Pauses a media player", **media),
        _service_intent("HassMediaNext", "Skips a media player to the next item", **media),
        _service_intent("HassMediaPrevious", "Replays the previous item for a media player", **media),
        _service_intent("HassSetVolume", "Sets the volume percentage of a media player", **media, required=[
            ("volume_level", _prop("integer", description="The volume percentage of the media player"))]),
        # volume_step is vol.Any("up", "down", range): an anyOf, which ollama's Property model drops.
        _tool("HassSetVolumeRelative", "Increases or decreases the volume of a media player",
              {"volume_step": {}, "name": _string(), "area": _string(), "floor": _string()}, ["volume_step"]),
        _service_intent("HassMediaPlayerMute", "Mutes a media player", **media, optional=[mute]),
        _service_intent("HassMediaPlayerUnmute", "Unmutes a media player", **media, optional=[mute]),
        _tool("HassMediaSearchAndPlay", "Searches for media and plays the first result",
              {"search_query": _string(), "media_class": _prop("string", enum=list(MEDIA_CLASSES)),
               "name": _string(), "area": _string(), "floor": _string()}, ["search_query"]),
    ]


def _fan_intents():
    return [_service_intent("HassFanSetSpeed", "Sets a fan's speed by percentage", domains=["fan"], required=[
        ("percentage", _prop("integer", description="The speed percentage of the fan"))])]


def _todo_intents():
    item = {"item": _string(), "name": _string()}
    return [_tool("HassListAddItem", "Add item to a todo list", item, ["item", "name"]),
            _tool("HassListCompleteItem", "Complete item on a todo list", item, ["item", "name"])]


def _vacuum_intents():
    return [_service_intent("HassVacuumStart", "Starts a vacuum", domains=["vacuum"]),
            _service_intent("HassVacuumReturnToBase", "Returns a vacuum to base", domains=["vacuum"])]


def _humidifier_intents():
    return [_tool("HassHumidifierSetpoint", "Set desired humidity level",
                  {"name": _string(), "humidity": _prop("integer")}, ["name", "humidity"]),
            _tool("HassHumidifierMode", "Set humidifier mode", {"name": _string(), "mode": _string()},
                  ["name", "mode"])]


def _lawn_mower_intents():
    return [_service_intent("HassLawnMowerStartMowing", "Starts a lawn mower", domains=["lawn_mower"]),
            _service_intent("HassLawnMowerDock", "Sends a lawn mower to dock", domains=["lawn_mower"])]


# (the domains that offer them, or None for always; their tools), in the order they are registered here.
_INTENT_GROUPS = (
    (None, _core_intents),
    ({"cover", "valve"}, _position_intents),
    (None, lambda: [_cancel_all_timers()]),
    ({"light"}, _light_intents),
    ({"climate"}, _climate_intents),
    ({"media_player"}, _media_player_intents),
    ({"fan"}, _fan_intents),
    ({"todo"}, _todo_intents),
    ({"vacuum"}, _vacuum_intents),
    ({"humidifier"}, _humidifier_intents),
    ({"lawn_mower"}, _lawn_mower_intents),
)


def _get_date_time():
    return _tool("GetDateTime", "Provides the current date and time.")


def _todo_get_items(names):
    return _tool("todo_get_items", "Query a to-do list to find out what items are on it. Use this to answer "
                 "questions like 'What's on my task list?' or 'Read my grocery list'. Filters items by status "
                 "(needs_action, completed, all).", {
                     "todo_list": _prop("string", enum=list(names)),
                     "status": _prop("string", description="Filter returned items by status, by default returns "
                                                           "incomplete items",
                                     enum=["needs_action", "completed", "all"])}, ["todo_list"])


def _get_live_context():
    return _tool("GetLiveContext", "Provides real-time information about the CURRENT state, value, or mode of "
                 "devices, sensors, entities, or areas. Use this tool for: 1. Answering questions about current "
                 "conditions (e.g., 'Is the light on?'). 2. As the first step in conditional actions (e.g., 'If "
                 "the weather is rainy, turn off sprinklers' requires checking the weather first).")


def assist_tools(entities):
    """The `tools` list the Assist API gives for these exposed entities, in the client's serialization."""
    if any(e.domain in ("script", "calendar") for e in entities):
        raise ValueError("scripts and calendars become tools of their own, which this generator does not make")
    domains = {e.domain for e in entities}
    tools = []
    for wanted, make in _INTENT_GROUPS:
        if wanted is None or wanted & domains:
            tools.extend(make())
    tools.append(_get_date_time())
    if "todo" in domains:
        tools.append(_todo_get_items([name for e in sorted(entities, key=lambda e: e.name) if e.domain == "todo"
                                      for name in (e.name, *e.aliases)]))
    if domains:
        tools.append(_get_live_context())
    return tools


def tool_by_name(tools, name):
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool
    raise KeyError(name)


# -- messages and bodies ------------------------------------------------------------------------------------------
def _message(message):
    """A message as the client sends it: role, content, thinking, images, tool_calls; falsy fields dropped."""
    out = {}
    for key in ("role", "content", "thinking", "images", "tool_calls"):
        value = message.get(key)
        if value:
            out[key] = value
    return out


def _body(model, messages, tools):
    return {"model": model, "stream": True, "options": {"num_ctx": NUM_CTX}, "keep_alive": KEEP_ALIVE,
            "messages": [_message(m) for m in messages], "tools": tools, "think": THINK}


def assist_request(entities, user_text, history=(), model=DEFAULT_MODEL):
    """The body HA sends with Control Home Assistant (Assist) on: system, earlier turns, the user's turn."""
    messages = [{"role": "system", "content": assist_system_prompt(entities)}, *history,
                {"role": "user", "content": user_text}]
    return _body(model, messages, assist_tools(entities))


def plain_request(user_text, history=(), model=DEFAULT_MODEL):
    """The body without an LLM API: the instructions and the date as system prompt, and `"tools": []`."""
    messages = [{"role": "system", "content": plain_system_prompt()}, *history,
                {"role": "user", "content": user_text}]
    return _body(model, messages, [])


def tool_call_message(call):
    """The assistant turn HA sends back after the model called a tool (its content, "" when streamed beside a
    tool call, is dropped by the client). `call`: {"name": ..., "arguments": {...}}."""
    arguments = {k: v for k, v in call["arguments"].items() if v is not None and v != ""}
    return {"role": "assistant", "tool_calls": [{"function": {"name": call["name"], "arguments": arguments}}]}


def intent_result(entity):
    """The tool result of a successful HassTurnOn/HassTurnOff/... on one entity, matched by name."""
    return {"speech": {}, "response_type": "action_done",
            "data": {"targets": [], "success": [{"name": entity.name, "type": "entity", "id": entity.entity_id}],
                     "failed": []}}


def json_dumps(value):
    """HA's helpers.json.json_dumps (orjson): compact, UTF-8 as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def tool_result_message(result):
    return {"role": "tool", "content": json_dumps(result)}


def default_call(entity):
    return {"name": "HassTurnOn", "arguments": {"name": entity.name, "domain": [entity.domain]}}


def tool_result_request(entities, user_text, call=None, result=None, history=(), model=DEFAULT_MODEL):
    """The follow-up body after the model called a tool: ..., user, assistant with tool_calls, tool result.

    `call` defaults to HassTurnOn of the first entity by name and domain; `result` (the tool's JSON result)
    to the intent response of a successful call on the entity the call names."""
    entities = list(entities)
    if call is None:
        call = default_call(entities[0])
    if result is None:
        named = [e for e in entities if e.name == call["arguments"].get("name")]
        if not named:
            raise ValueError("give the result: the call names no exposed entity")
        result = intent_result(named[0])
    body = assist_request(entities, user_text, history, model)
    body["messages"] += [_message(tool_call_message(call)), _message(tool_result_message(result))]
    return body


# -- fixtures ---------------------------------------------------------------------------------------------------------
FIXTURES = {
    "assist_0_entities.json": lambda: assist_request(home(0), "turn on the kitchen light"),
    "assist_1_light.json": lambda: assist_request(home(1), "turn on the kitchen light"),
    "assist_17_entities.json": lambda: assist_request(HOME_17, "turn on the kitchen light"),
    "assist_37_entities.json": lambda: assist_request(home(37), "turn on the kitchen light"),
    "plain_chat.json": lambda: plain_request("What is the capital of France?"),
    "tool_result_17_entities.json": lambda: tool_result_request(HOME_17, "turn on the kitchen light"),
}


def write_fixtures(folder):
    """Writes the fixtures (JSON, indent 1) into folder; returns their paths."""
    import pathlib
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in FIXTURES.items():
        path = folder / name
        path.write_text(json.dumps(make(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    import pathlib
    import sys
    target = sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[1] / "fixtures" / \
        "home_assistant"
    for written in write_fixtures(target):
        print(written)
