"""From a typed request (generation.py) to what the card runs, the same for every API: the model checked, the
prompt rendered by the chat template and fitted to the window (window.py) or taken as it is, the request's
class (scheduling.py), its limits and where its answer ends (stop strings; a JSON value: structured.py)."""
import functools

from jinja2 import TemplateError

from app.errors import APIError
from app.generation import UNTIL_THE_WINDOW, ChatRequest, Prepared
from app.runner.jobs import GenerationSpec
from app.structured import JsonValueCut
from app.tools import required_instruction, tool_names
from app.window import Conversation, fit


def prepare(backend, request, headers):
    """A Prepared for a ChatRequest or a PromptRequest; the client's mistakes are APIErrors (400, 404)."""
    backend.check_model(request.model)
    window = min(request.window or backend.window, backend.window)
    if isinstance(request, ChatRequest):
        return _prepare_chat(backend, request, headers, window)
    return _prepare_prompt(backend, request, headers, window)


def _spec(backend, request, prompt_ids, headers, messages, json_answer):
    """The GenerationSpec: the configured output limit when the request names none (None: the window's); the
    card stops after a JSON value when one is asked for and no tool is offered (a tool call is JSON too)."""
    cutters = (functools.partial(JsonValueCut, request.json_format.opener),) if json_answer else ()
    max_tokens = request.max_tokens or backend.settings["generation"]["max_tokens"]
    return GenerationSpec(
        prompt_ids=tuple(prompt_ids), max_tokens=None if max_tokens == UNTIL_THE_WINDOW else max_tokens,
        stop_strings=tuple(request.stop_strings), cutters=cutters,
        request_class=backend.request_class(headers, messages, request.model), streamed=request.stream)


def _prepare_chat(backend, request, headers, window):
    context = backend.settings["context"]
    # The answer's room: the configured reserve, or less when the request asks for less; and never more than
    # half of a small window (Ollama's num_ctx), or nothing of the conversation could stay.
    reserve = min(context["reserve_tokens"], request.max_tokens or context["reserve_tokens"], window // 2)
    tools = list(request.tools)
    fmt = request.json_format
    try:
        conversation = Conversation(
            backend.tokenizer, request.messages, tools, keep_tool=request.forced_tool,
            tool_instruction=required_instruction(request.forced_tool, request.tool_required) if tools else None,
            format_instruction=fmt.instruction() if fmt else None, ending=request.ending)
        fitted = fit(conversation, window, reserve, context["overflow"], context["tool_reserve_tokens"])
    except (TemplateError, TypeError, ValueError, RecursionError) as exc:
        raise APIError(400, f"The conversation cannot be rendered by the model's chat template: {exc}",
                       param="messages") from None
    names = tuple(tool_names(tools))
    asked = bool(tools) and (request.tool_required or request.forced_tool is not None)
    if fitted.unfit_reason:
        if fmt or asked:  # the client wants JSON or a tool call: words of ours would break its promise
            raise APIError(400, fitted.unfit_reason, param="tools", code="context_length_exceeded")
        return Prepared(None, (), names, fmt, fitted, asked, explanation=fitted.unfit_reason)
    spec = _spec(backend, request, fitted.prompt_ids, headers, request.messages, fmt is not None and not tools)
    return Prepared(spec, tuple(fitted.prompt_ids), names, fmt, fitted, asked)


def _prepare_prompt(backend, request, headers, window):
    """Token ids as given, else raw text, else messages by the chat template (with the JSON format's
    instruction), after the context's ids; never fitted: what does not fit is a 400."""
    tokenizer = backend.tokenizer
    fmt = request.json_format
    if request.ids is not None:
        bad = next((i for i in request.ids if not tokenizer.valid_id(i)), None)
        if bad is not None:
            raise APIError(400, f"Token id {bad} is outside the vocabulary.", param=request.param)
        ids = list(request.ids)
    elif request.text is not None:
        ids = tokenizer.encode(request.text)
    else:
        instruction = [{"role": "system", "content": fmt.instruction()}] if fmt else []
        ids = tokenizer.chat_ids(list(request.messages) + instruction)
    if not ids:
        raise APIError(400, "The prompt is empty.", param=request.param)
    if not all(tokenizer.valid_id(i) for i in request.context):
        raise APIError(400, "context holds token ids outside the vocabulary")
    ids = list(request.context) + ids
    check_raw_prompt(ids, request.param, window, len(request.context))
    messages = request.messages or [{"role": "user", "content": request.text if request.text is not None
                                     else tokenizer.decode(request.ids)}]
    return Prepared(_spec(backend, request, ids, headers, messages, fmt is not None), tuple(ids), (), fmt)


def check_raw_prompt(prompt_ids, param, window, context_tokens=0):
    """A raw prompt (no chat template: nothing to leave out) must fit the window as it is."""
    if len(prompt_ids) > window:
        carried = f" ({context_tokens} of them from `context`)" if context_tokens else ""
        raise APIError(400, f"This model's maximum context length is {window} tokens. However, your {param} "
                       f"resulted in {len(prompt_ids)} tokens{carried}. Please reduce the length of the {param}.",
                       param=param, code="context_length_exceeded")
