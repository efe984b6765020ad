"""One generation, whichever API asks for it: the request as a wire adapter parses it (API-neutral), and what
prepare() makes of it. An endpoint costs a parser (its body into one of these requests) and a writer (the
bytes of its answer); everything between is shared (ARCHITECTURE.md in docs/)."""
import sys
from dataclasses import dataclass

from app.runner.jobs import GenerationSpec
from app.window import Fit

# A request's max_tokens when only the window bounds the answer (Ollama's num_predict 0, -1 or -2).
UNTIL_THE_WINDOW = sys.maxsize


@dataclass(frozen=True)
class ChatRequest:
    """A conversation for the chat template, fitted to the window (/v1/chat/completions, /api/chat)."""
    messages: tuple                 # as the chat template reads them (openai_format.py, ollama_format.py)
    model: str | None = None
    tools: tuple = ()               # the tool definitions as the client sent them ("none" chosen: none)
    forced_tool: str | None = None  # tool_choice named this tool
    tool_required: bool = False     # tool_choice "required"
    json_format: object = None      # a JsonFormat (structured.py): the answer must be this JSON
    ending: str = "generate"        # QwenTokenizer.chat_ids: "generate", "none" or "continue"
    max_tokens: int | None = None
    stop_strings: tuple = ()
    window: int | None = None       # a smaller window asked for (Ollama's num_ctx)
    stream: bool = False
    progress: bool = False          # stream events while it waits and while the card reads the prompt


@dataclass(frozen=True)
class PromptRequest:
    """A prompt taken as it is, never fitted (/v1/completions, /api/generate): raw text, token ids, or messages
    rendered by the chat template, after the ids of an earlier answer's context (Ollama's `context`)."""
    text: str | None = None
    ids: tuple | None = None
    messages: tuple | None = None
    context: tuple = ()
    model: str | None = None
    json_format: object = None
    max_tokens: int | None = None
    stop_strings: tuple = ()
    window: int | None = None
    stream: bool = False
    progress: bool = False
    param: str = "prompt"           # the field a 400 names


@dataclass(frozen=True)
class Prepared:
    """What prepare() decided: the spec the card runs, and what serve() needs to make the answer of its text.
    `explanation`, when set, is the answer instead: the card is not asked (a tool the request needs does not
    fit the window)."""
    spec: GenerationSpec | None
    prompt_ids: tuple               # the ids fed (/api/generate's `context` carries them back)
    tool_names: tuple = ()          # calls to other names stay text
    json_format: object = None
    fit: Fit | None = None          # what the window fit left out (headers, the log line, metrics)
    tool_asked: bool = False        # tool_choice asked for a call (nothing can force one: serve() says so)
    explanation: str | None = None
