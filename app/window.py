"""Fit a conversation to the card's 1024-token window, spending it on what the person asked.

When the rendered prompt would not leave `reserve` tokens for the answer, the oldest turns go first, as
whole exchanges (a user turn with every assistant, tool-call and tool-result message after it: a tool result
never loses its call), always keeping the system messages and the last user turn with whatever follows it.
If that is not enough, the tool definitions are chosen: those the last user message asks for stay, as many as
fit (compacted if need be), in a room that leaves the answer `tool_reserve` tokens (a call is short), and the
others go (tool_selection.py); a tool named by tool_choice always stays. Only when the system messages and the
last turn alone cannot fit the window is it an error, and the error says what takes the space.

Counting is cheap: each message group is rendered by the chat template and tokenized once. The template
puts every group between special tokens (`<|im_start|>` ... `<|im_end|>\\n`), and text is tokenized
separately on each side of a special token, so the prompt's length is exactly the sum of its groups' lengths;
the kept prompt is then rendered and tokenized once more, as a whole.
"""
import functools
from dataclasses import dataclass

from app.errors import APIError
from app.tokenizer.pieces import DEFAULT_SYSTEM_PROMPT
from app.tool_selection import select, tool_json

EMPTY_SYSTEM = {"role": "system", "content": ""}


# How the response says what the fit left out (docs/API.md, "The 1024-token window"); exposed to CORS clients.
DROPPED_MESSAGES = "X-Context-Dropped-Messages"
DROPPED_TOOLS = "X-Context-Dropped-Tools"
KEPT_TOOLS = "X-Context-Kept-Tools"
COMPACTED_TOOLS = "X-Context-Compacted-Tools"
UNFIT_TOOL = "X-Context-Unfit-Tool"
DECISION_HEADERS = (DROPPED_MESSAGES, DROPPED_TOOLS, KEPT_TOOLS, COMPACTED_TOOLS, UNFIT_TOOL)


@dataclass
class Fit:
    """The prompt the card will be fed, and what was left out to make it fit: messages, tool definitions, and
    (when the tools had to be chosen) the names of those kept and how many of them were compacted."""
    prompt_ids: list
    dropped_messages: int = 0
    dropped_tools: int = 0
    kept_tools: list | None = None
    compacted_tools: int = 0
    # The person asked for a tool and not even its smallest rendering fits: why, in words, and its name.
    unfit_tool: str | None = None
    unfit_reason: str | None = None

    def headers(self):
        """What was left out, as response headers."""
        headers = []
        if self.dropped_messages or self.dropped_tools:
            headers += [(DROPPED_MESSAGES, str(self.dropped_messages)), (DROPPED_TOOLS, str(self.dropped_tools))]
        if self.kept_tools is not None:
            # Tool names are 1-64 of [A-Za-z0-9_.-] (schemas.py), and only the few that fit are kept.
            headers += [(KEPT_TOOLS, ",".join(self.kept_tools)), (COMPACTED_TOOLS, str(self.compacted_tools))]
        if self.unfit_tool:
            headers.append((UNFIT_TOOL, self.unfit_tool))
        return headers


class _Group:
    """Messages that stay or go together, and their tokens: counted when first asked for (a long conversation
    is counted from its newest turns only as far as the window reaches)."""

    def __init__(self, messages, count, droppable):
        self.messages = messages
        self.droppable = droppable
        self._count = count
        self._tokens = None

    @property
    def tokens(self):
        if self._tokens is None:
            self._tokens = self._count(self.messages)
        return self._tokens


class Conversation:
    """A conversation as the chat template renders it, split into groups that can be counted and dropped."""

    def __init__(self, tokenizer, messages, tools=None, keep_tool=None, tool_instruction=None,
                 format_instruction=None, ending="generate"):
        self.tokenizer = tokenizer
        self.messages = list(messages)
        self.tools = list(tools or [])
        self.keep_tool = keep_tool          # the tool named by tool_choice: it stays when tools must go
        self.tool_instruction = tool_instruction  # tool_choice's instruction: a system turn while tools stay
        self.format_instruction = format_instruction  # the JSON answer's format: a system turn, always there
        self.ending = ending                # QwenTokenizer.chat_ids: "generate", "none" or "continue"
        first_is_system = bool(self.messages) and self.messages[0]["role"] == "system"
        self.head = self.messages[0] if first_is_system else {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
        self.head_given = first_is_system
        self._rest = self.messages[1:] if first_is_system else self.messages

    @functools.cached_property
    def groups(self):
        return self._groups(self._rest)

    # -- the whole prompt ------------------------------------------------------------------------------
    def render_ids(self, groups=None, tools=None):
        messages = ([self.head] if self.head_given else [])
        for group in self.groups if groups is None else groups:
            messages += group.messages
        tools = self.tools if tools is None else tools
        # The instructions are the last system turns; an answer to continue stays last of all.
        final = [messages.pop()] if self.ending == "continue" else []
        messages += [{"role": "system", "content": text} for text in self._instructions(tools)] + final
        return self.tokenizer.chat_ids(messages, tools or None, ending=self.ending)

    def _instructions(self, tools):
        return [text for text in (self.tool_instruction if tools else None, self.format_instruction) if text]

    # -- counting ----------------------------------------------------------------------------------------
    @functools.cached_property
    def _empty_head(self):
        return self.tokenizer.render_chat([EMPTY_SYSTEM], add_generation_prompt=False)

    def _count(self, messages):
        """Tokens of a group of messages as they render inside a conversation (after its system turn)."""
        text = self.tokenizer.render_chat([EMPTY_SYSTEM, *messages], add_generation_prompt=False)
        return len(self.tokenizer.encode(text[len(self._empty_head):]))

    def head_tokens(self, tools):
        """The system turn (with the tools) and the instructions."""
        tokens = len(self.tokenizer.encode(self.tokenizer.render_chat([self.head], tools or None,
                                                                      add_generation_prompt=False)))
        tokens += sum(self._count([{"role": "system", "content": text}]) for text in self._instructions(tools))
        return tokens

    def request_text(self):
        """What the person asked last: the last user message, and the names of tools called after it (their
        results are what the model reads next)."""
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last_user is None:
            return ""
        called = [call.get("function", call).get("name", "") for m in self.messages[last_user + 1:]
                  for call in m.get("tool_calls") or () if isinstance(call, dict)]
        content = self.messages[last_user]["content"]
        return " ".join([content if isinstance(content, str) else "", *filter(None, called)])

    def tool_tokens(self, up_to):
        """What the tool definitions, as sent, add to the prompt (the tools block and tool_choice's turn
        included); None as soon as that is more than `up_to` (3,000 tools are not all counted to find out)."""
        tools = self.tools
        if not tools:
            return 0
        total = self._tool_block(tools[0])
        for tool in tools:
            total += self._line_tokens(tool_json(tool) + "\n")
            if total > up_to:
                return None
        return total

    def total_tokens(self):
        """The whole prompt as sent, counted (for messages that say how long it is)."""
        return (self.head_tokens(self.tools) + sum(g.tokens for g in self.groups)
                + self.tokenizer.ending_tokens(self.ending))

    def _line_tokens(self, text):
        return len(self.tokenizer.encode(text))

    def _tool_block(self, tool):
        """What the tools block adds besides the tools' own lines (its instructions, tags; tool_choice's turn):
        the lines add up exactly, since each starts after a newline and ends with one."""
        return self.head_tokens([tool]) - self.head_tokens([]) - self._line_tokens(tool_json(tool) + "\n")

    def select_tools(self, budget):
        """The tools the request needs most that fit `budget` tokens (tool_selection.py)."""
        context = [m["content"] for m in self.messages if m["role"] == "system" and isinstance(m["content"], str)]
        return select(self.tools, self.request_text(), budget, self._line_tokens, self._tool_block(self.tools[0]),
                      keep=self.keep_tool, context=context)

    def _groups(self, messages):
        """Later system messages each on their own (kept), then exchanges: each user turn with the messages
        after it, the oldest droppable, the last one kept with whatever follows it."""
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:  # no user turn at all: nothing can be dropped
            return [_Group(list(messages), self._count, droppable=False)] if messages else []
        groups, current = [], []

        def close(droppable):
            if current:
                groups.append(_Group(list(current), self._count, droppable))
                current.clear()

        for i, message in enumerate(messages):
            if i == last_user:
                close(droppable=True)
                current.extend(messages[i:])
                close(droppable=False)
                break
            if message["role"] == "system":
                close(droppable=True)
                groups.append(_Group([message], self._count, droppable=False))
            elif message["role"] == "user":
                close(droppable=True)
                current.append(message)
            else:
                current.append(message)
        return groups


def newest_that_fit(groups, room):
    """How many of the newest `groups` fit in `room` tokens (counting stops at the first that does not)."""
    fitting = 0
    for group in reversed(groups):
        if group.tokens > room:
            break
        room -= group.tokens
        fitting += 1
    return fitting


def fit(conversation, window, reserve, overflow="truncate", tool_reserve=None):
    """The prompt to feed the card: the whole conversation when it leaves `reserve` tokens of `window` for the
    answer, else (overflow "truncate") the oldest exchanges left out, and when the tools alone leave no room,
    only the tools the request needs kept, with `tool_reserve` (at most `reserve`) left for the answer. Raises a
    400 context_length_exceeded when even the system messages and the last turn cannot fit `window`.

    The cost is bounded by the window, not by the conversation: what always stays is counted, then the tools
    and the earlier turns, newest first, only as far as they fit."""
    groups = conversation.groups
    kept = [g for g in groups if not g.droppable]
    droppable = [g for g in groups if g.droppable]
    # What always stays: the system turn, later system messages, the last turn, the prompt's end.
    fixed = (conversation.head_tokens([]) + sum(g.tokens for g in kept)
             + conversation.tokenizer.ending_tokens(conversation.ending))
    # As sent, if it leaves the reserve (or, with overflow "error", if it fits at all).
    limit = window if overflow == "error" else window - reserve
    tool_tokens = conversation.tool_tokens(up_to=max(0, limit - fixed))
    if (tool_tokens is not None and fixed + tool_tokens <= limit
            and newest_that_fit(droppable, limit - fixed - tool_tokens) == len(droppable)):
        ids = conversation.render_ids()
        if len(ids) <= limit:  # the counts are exact (tests hold them so); this only guards the card
            return Fit(ids)
    if overflow == "error":
        raise too_long(conversation, window, ", and nothing is left out (context.overflow is error)")
    if fixed > window:
        # Before any tool is weighed: choosing costs time that grows with the words of what always stays.
        raise too_long(conversation, window, ", which cannot fit even with earlier turns and tool definitions left out")
    tools, selection = conversation.tools, None
    if tools and (tool_tokens is None or fixed + tool_tokens + reserve > window):
        # Even without any earlier turn the tools leave no room: the ones the request needs stay.
        selection = conversation.select_tools(window - min(tool_reserve or reserve, reserve) - fixed)
        tools, tool_tokens = selection.tools, selection.tokens
    if fixed + tool_tokens > window:
        raise too_long(conversation, window, ", which cannot fit even with earlier turns and tool definitions left out")
    # Earlier turns fill what is left of the window, leaving the answer its whole reserve; the oldest go.
    dropped = len(droppable) - newest_that_fit(droppable, window - reserve - fixed - tool_tokens)
    dropped_ids = {id(g) for g in droppable[:dropped]}
    chosen = [g for g in groups if id(g) not in dropped_ids]
    ids = conversation.render_ids(chosen, tools)
    if len(ids) > window:  # the counts are exact (tests hold them so); this only guards the card
        raise too_long(conversation, window, " after leaving out earlier turns")
    fitted = Fit(ids, dropped_messages=sum(len(g.messages) for g in droppable[:dropped]),
                 dropped_tools=len(conversation.tools) - len(tools))
    if selection is not None:
        fitted.kept_tools, fitted.compacted_tools = selection.names, selection.compacted
        # Asked to act, with no tool that fits, the model could only pretend it acted. (Once the tools have
        # answered, the model needs none to say what they did.)
        if selection.needed and not selection.tools and conversation.messages[-1]["role"] == "user":
            fitted.unfit_tool = selection.needed
            fitted.unfit_reason = unfit_reason(selection, fixed, window, min(tool_reserve or reserve, reserve))
    return fitted


def unfit_reason(selection, fixed, window, reserve):
    return (f"This request needs the tool {selection.needed}, and it does not fit: the card's window is {window} "
            f"tokens, this conversation takes {fixed:,} of them without any tool definition, and "
            f"{selection.needed} takes {selection.needed_tokens:,} at its smallest, with {reserve} kept for the "
            "answer. Nothing was done. Shorten the system prompt (in Home Assistant: expose fewer entities to "
            "Assist).")


def too_long(conversation, window, why):
    """The 400 that says what takes the space (counting all of it: the request's limits bound this)."""
    prompt_tokens = conversation.total_tokens()
    groups = conversation.groups
    parts = [f"system {conversation.head_tokens([]):,} tokens"]
    if conversation.tools:
        tool_tokens = conversation.head_tokens(conversation.tools) - conversation.head_tokens([])
        count = len(conversation.tools)
        parts.append(f"{count} tool definition{'s' if count != 1 else ''} {tool_tokens:,} tokens")
    other_system = [g for g in groups if not g.droppable and g.messages[0]["role"] == "system"]
    if other_system:
        parts.append(f"other system messages {sum(g.tokens for g in other_system):,} tokens")
    earlier = [g for g in groups if g.droppable]
    if earlier:
        count = sum(len(g.messages) for g in earlier)
        parts.append(f"{count} earlier message{'s' if count != 1 else ''} {sum(g.tokens for g in earlier):,} tokens")
    last = [g for g in groups if not g.droppable and g.messages[0]["role"] != "system"]
    if last:
        count = len(last[0].messages)
        name = "last message" if count == 1 else f"last turn ({count} messages)"
        parts.append(f"{name} {last[0].tokens:,} tokens")
    # OpenAI's wording first: clients (LangChain, LiteLLM) read the two numbers from it.
    message = (f"This model's maximum context length is {window} tokens. However, your messages resulted in "
               f"{prompt_tokens} tokens{why}: {', '.join(parts)}. Shorten the last message or the system prompt.")
    return APIError(400, message, param="messages", code="context_length_exceeded")
