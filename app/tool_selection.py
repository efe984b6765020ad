"""Which tool definitions to keep when they do not all fit the window, and how to make one smaller.

Front ends attach every tool they have to every request: Home Assistant's Assist sends some 24 (3,185 tokens
for a home of 17 entities), Open WebUI 36 (3,883 tokens), against a window of 1024 for the whole prompt and
answer. Dropping them all means the model can never act; keeping them all is impossible. So the tools the
person's last message asks for are kept, as many as fit, and the rest go.

Relevance: the words of the last user message (and the names of tools called after it) against each tool's
name, description, parameter names and allowed values. A word counts 3 in a tool's name, 2 in a parameter's
name or allowed values, 1 in its description, times how rare it is among the offered tools (log(1 + tools /
tools with the word)), so that words every tool has ("the", "user", "Hass") weigh nothing. Names are split
into words (`HassTurnOn`: hass, turn, on; `get_current_timestamp`: get, current, timestamp), plurals are
folded, and the filler words of questions are ignored. A tool scores the sum over the message's distinct
words, plus the words the system messages' list items tie to them (a home's overview says that "Thermostat" is
a climate device) at half weight. Tools that score at least half the best score are candidates (a word shared
by chance does not spend the card's seconds on a tool nobody asked for: each kept tool costs ~100 tokens, 7 s
at the card's pace), taken best first, each in the largest rendering that still fits: as sent, compact, or
minimal (below). When the best one does not fit at all, none is kept: lesser tools would only tempt the model
to do something else. The kept tools go to the model in the client's order.

Renderings (deterministic, documented in docs/API.md):
- as sent;
- compact: the function's description cut to its first sentence; in the parameters' schema, the
  descriptions, titles, examples, defaults and `$schema` are dropped (names, types, `enum`s, `required`,
  `items` and nesting stay);
- minimal: the first sentence of the description, and each top-level parameter's name and type (arrays keep
  their items' type; enums of up to 8 values stay), with `required`.
"""
import json
import math
import re
from dataclasses import dataclass

COMPACT, MINIMAL = "compact", "minimal"
RELATIVE_THRESHOLD = 1 / 2   # of the best tool's score
MINIMAL_ENUM = 8             # a minimal rendering keeps an enum of at most this many values
NAME_WEIGHT, PARAMETER_WEIGHT, DESCRIPTION_WEIGHT = 3.0, 2.0, 1.0
RELATED_WEIGHT = 0.5         # a word the system messages relate to the person's, against the person's own
SCHEMA_NOTES = ("description", "title", "examples", "default", "$schema")
# Words that say nothing about which tool a request needs. Not "on", "off", "up", "down", "all", "now": they do.
FILLER = frozenset("""
a an the and or but if of to in into at by for from with about as is are am was were be been being do does
did doing done can could would should will shall may might must i me my mine we us our you your yours he she
him her his they them their it its this that these those there here what whats which who whom whose when
where why how please pls thanks thank hi hello hey ok okay yes no not just some any very so too also than
then tell let lets s t d ll m re ve want need like
""".split())
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_WORD = re.compile(r"[a-z0-9]+")


def words(text):
    """The distinct meaningful words of a text: camelCase and snake_case split, lower case, plurals folded."""
    if not isinstance(text, str):
        return set()
    found = set()
    for word in _WORD.findall(_CAMEL.sub(" ", text).lower()):
        if word in FILLER:
            continue
        found.add(_fold(word))
    return found


def _fold(word):
    """lights -> light, switches -> switch, batteries -> battery; short words and -ss stay."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _function(tool):
    function = tool.get("function") if isinstance(tool, dict) else None
    return function if isinstance(function, dict) else {}


def tool_name(tool):
    name = _function(tool).get("name")
    return name if isinstance(name, str) else None


def _parameter_words(schema, depth=0):
    """Words of a parameters schema's property names and allowed values (enums, consts), nested included."""
    found = set()
    if depth > 8 or not isinstance(schema, dict):
        return found
    for name, sub in (schema.get("properties") or {}).items() if isinstance(schema.get("properties"), dict) else ():
        found |= words(name)
        found |= _parameter_words(sub, depth + 1)
    for key in ("enum", "const"):
        values = schema.get(key)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str):
                found |= words(value)
    for key in ("items", "anyOf", "oneOf", "allOf"):
        value = schema.get(key)
        for sub in value if isinstance(value, list) else [value]:
            found |= _parameter_words(sub, depth + 1)
    return found


def list_items(text):
    """The items of the lists in a text: a line starting "- " or "* " and the more indented lines under it."""
    items, current, indent = [], None, 0
    for line in text.splitlines() if isinstance(text, str) else ():
        stripped = line.lstrip()
        depth = len(line) - len(stripped)
        if stripped.startswith(("- ", "* ")):
            current = [stripped[2:]]
            indent = depth
            items.append(current)
        elif current is not None and stripped and depth > indent:
            current.append(stripped)
        else:
            current = None
    return [" ".join(item) for item in items]


def related_words(query, context):
    """Words the system messages tie to the person's, with their weight: the words of each list item that
    names one of the query's words (a home's overview says that "Thermostat" is a climate device, that "Living
    Room Lamp" is a light), RELATED_WEIGHT shared among the items that word names."""
    items = [words(item) for text in context for item in list_items(text)]
    related = {}
    for word in query:
        naming = [item for item in items if word in item]
        for item in naming:
            for other in item - set(query):
                related[other] = related.get(other, 0.0) + RELATED_WEIGHT / len(naming)
    return related


class Relevance:
    """Scores tools against a request's words (see the module's docstring)."""

    def __init__(self, tools):
        self.fields = []
        for tool in tools:
            function = _function(tool)
            self.fields.append((words(function.get("name")), _parameter_words(function.get("parameters")),
                                words(function.get("description"))))
        count = len(self.fields)
        presence = {}
        for name, parameters, description in self.fields:
            for word in name | parameters | description:
                presence[word] = presence.get(word, 0) + 1
        self.rarity = {word: math.log(1 + count / seen) for word, seen in presence.items()}

    def scores(self, text, context=()):
        query = {word: 1.0 for word in words(text)}
        query.update(related_words(query, context))
        out = []
        for name, parameters, description in self.fields:
            score = 0.0
            for word, weight in query.items():
                where = (NAME_WEIGHT if word in name else PARAMETER_WEIGHT if word in parameters
                         else DESCRIPTION_WEIGHT if word in description else 0.0)
                if where:
                    score += weight * where * self.rarity[word]
            out.append(score)
        return out

    def candidates(self, text, context=()):
        """Indexes of the tools worth keeping for `text`, best first (ties: the client's order). `context`:
        the system messages, whose list items can say what the person's words are (see related_words)."""
        scores = self.scores(text, context)
        best = max(scores, default=0.0)
        if best <= 0:
            return []
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [i for i in ranked if scores[i] >= best * RELATIVE_THRESHOLD]


# -- renderings ------------------------------------------------------------------------------------------
def first_sentence(text):
    if not isinstance(text, str):
        return text
    match = re.match(r"(.+?[.!?])(\s|$)", text.strip(), re.S)
    return (match.group(1) if match else text.strip()).strip()


def _without_notes(schema, depth=0):
    if depth > 32:
        return schema
    if isinstance(schema, list):
        return [_without_notes(item, depth + 1) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in SCHEMA_NOTES and not isinstance(value, dict):
            continue  # a note about the schema (a property *named* "description" is a dict and stays)
        if key in ("enum", "const", "required"):
            out[key] = value
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: _without_notes(sub, depth + 1) for name, sub in value.items()}
        else:
            out[key] = _without_notes(value, depth + 1)
    return out


def _minimal_property(schema):
    if not isinstance(schema, dict):
        return {}
    out = {}
    for key in ("type", "anyOf"):
        if key in schema:
            value = schema[key]
            out[key] = [{"type": s.get("type")} for s in value if isinstance(s, dict)] if key == "anyOf" else value
    enum = schema.get("enum")
    if isinstance(enum, list) and len(enum) <= MINIMAL_ENUM:
        out["enum"] = enum
    items = schema.get("items")
    if isinstance(items, dict):
        out["items"] = _minimal_property(items)
    return out


def render(tool, level):
    """The tool as the model will read it, at a level: None (as sent), COMPACT or MINIMAL."""
    if level is None:
        return tool
    function = _function(tool)
    out = {"name": function.get("name")}
    if function.get("description") is not None:
        out["description"] = first_sentence(function["description"])
    parameters = function.get("parameters")
    if isinstance(parameters, dict):
        if level == COMPACT:
            out["parameters"] = _without_notes(parameters)
        else:
            properties = parameters.get("properties")
            minimal = {"type": parameters.get("type", "object")}
            if isinstance(properties, dict):
                minimal["properties"] = {name: _minimal_property(sub) for name, sub in properties.items()}
            if isinstance(parameters.get("required"), list):
                minimal["required"] = parameters["required"]
            out["parameters"] = minimal
    return {"type": tool.get("type", "function"), "function": out}


def tool_json(tool):
    """A tool as the chat template writes it (its `tojson`: json.dumps, non-ASCII kept)."""
    return json.dumps(tool, ensure_ascii=False)


@dataclass
class Selection:
    """The tools to render (in the client's order, some maybe compacted), and what the choice did. When the
    request asked for tools and none fit, `needed` names the one it asked for most and `needed_tokens` is
    what that one costs at its smallest, the tools block included."""
    tools: list
    tokens: int          # what they add to the prompt, the tools block's fixed text included
    compacted: int = 0
    dropped: int = 0
    needed: str | None = None
    needed_tokens: int = 0

    @property
    def names(self):
        return [tool_name(tool) for tool in self.tools]


def select(tools, text, budget, count, block_tokens, keep=None, context=()):
    """The tools worth keeping for `text` (the person's last message) within `budget` tokens.

    `count(text)` gives the tokens of one tool's line as the template adds it; `block_tokens` is what the tools
    block adds around them (its instructions and tags); `context`: the system messages (see related_words).
    `keep` names the tool tool_choice forces: it is the only one the model may call, so it is the only one
    kept, whatever it costs (the caller checks the window).
    """
    if keep is not None:
        order = [i for i, tool in enumerate(tools) if tool_name(tool) == keep][:1]
    else:
        order = Relevance(tools).candidates(text, context)
    chosen = {}
    room = budget - block_tokens
    for i in order:
        for level in (None, COMPACT, MINIMAL):
            rendered = render(tools[i], level)
            tokens = count(tool_json(rendered) + "\n")
            if tokens <= room or (keep is not None and level == MINIMAL):
                chosen[i] = (rendered, level)
                room -= tokens
                break
        else:
            if not chosen:
                # Without the tool asked for most, lesser ones would only tempt the model to do something else.
                return Selection([], 0, dropped=len(tools), needed=tool_name(tools[i]),
                                 needed_tokens=block_tokens + tokens)
    if not chosen:
        return Selection([], 0, dropped=len(tools))
    kept = [chosen[i][0] for i in sorted(chosen)]
    compacted = sum(1 for _, level in chosen.values() if level is not None)
    return Selection(kept, budget - room, compacted=compacted, dropped=len(tools) - len(kept))
