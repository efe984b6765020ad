// The service's HTTP API as the page uses it: the API key, a streamed chat with progress, and errors turned
// into sentences (a person never sees the service's JSON).

// What the page keeps in this browser. A browser that refuses storage (a privacy setting) throws on every use:
// the page then keeps nothing, and works.
export const stored = {
  get(name) {
    try {
      return localStorage.getItem(name) || "";
    } catch {
      return "";
    }
  },
  set(name, value) {
    try {
      if (value) localStorage.setItem(name, value);
      else localStorage.removeItem(name);
    } catch {
      // Refused, or full: not kept.
    }
  },
};

const KEY_STORAGE = "qwen-chat.api-key";

export const apiKey = {
  get: () => stored.get(KEY_STORAGE),
  set: (key) => stored.set(KEY_STORAGE, key),
};

function headers(key = apiKey.get()) {
  const out = { "Content-Type": "application/json" };
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

// A failure the page can explain: `title` says what happened, `detail` the service's own words or what to do.
export class ChatError extends Error {
  constructor(title, detail = "", status = 0) {
    super(detail ? `${title} ${detail}` : title);
    this.title = title;
    this.detail = detail;
    this.status = status;
  }

  get needsKey() {
    return this.status === 401;
  }
}

function sentence(text) {
  return text && !/[.!?]$/.test(text) ? `${text}.` : text;
}

// The service's error object ({message, type, code}) as a ChatError, from a response or an event of a stream.
function explain(error, status, retryAfter) {
  const message = sentence(typeof error?.message === "string" ? error.message : "");
  const code = error?.code ?? null;
  const wait = retryAfter ? ` Try again in ${retryAfter} s.` : "";
  if (status === 401) return new ChatError("The service did not accept the API key.", "", status);
  if (code === "context_length_exceeded") {
    return new ChatError(`This is too long for the card's ${document.body.dataset.window || 1024}-token window.`,
                         message, status);
  }
  if (code === "shutting_down") return new ChatError("The service is restarting.", `Send again in a moment.`, status);
  if (error?.type === "server_busy" || code === "queue_full" || code === "queue_timeout") {
    return new ChatError("The card is busy with other people's requests.", message + wait, status);
  }
  if (code === "card_unavailable") return new ChatError("The NPU card is unavailable.", message + wait, status);
  if (status === 503 || error?.type === "service_unavailable") {
    return new ChatError("The card could not answer.", message + wait, status);
  }
  if (status === 413) return new ChatError("This conversation is too large to send.", message, status);
  if (status >= 400 && status < 500) return new ChatError("The service refused the request.", message, status);
  return new ChatError("The service had a problem.", message || `It answered HTTP ${status}.`, status);
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's page, say): the status is all there is to tell.
  }
  const retryAfter = Number.parseInt(response.headers.get("Retry-After") || "", 10) || null;
  return explain(body?.error, response.status, retryAfter);
}

function unreachable() {
  return new ChatError("Cannot reach the service.", "Check that it is running, then send again.");
}

// The served model's name, or a ChatError (401 when a key is needed or wrong).
export async function modelName(key = apiKey.get()) {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers(key) });
  } catch {
    throw unreachable();
  }
  if (!response.ok) throw await failure(response);
  const body = await response.json();
  return body.data?.[0]?.id || "";
}

// How many tokens of the window `messages` take, counted by the service's tokenizer (no card time).
export async function countTokens(messages) {
  const response = await fetch("/tokenize", {
    method: "POST", headers: headers(), body: JSON.stringify({ messages, add_generation_prompt: false }),
  });
  if (!response.ok) throw await failure(response);
  return (await response.json()).count;
}

export async function health() {
  const response = await fetch("/health");
  return response.json();
}

// The parsed `data:` events of an SSE body until [DONE]; comments (keep-alives) are skipped.
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// One streamed chat with progress. `on` receives: opened({droppedMessages, droppedTools}), queued(queue),
// reading(prompt_progress), text(piece), finished({usage, timings, finishReason}). Resolves when the stream
// ends; rejects with a ChatError, or an AbortError when `signal` stopped it.
export async function streamChat({ model, messages, signal, on }) {
  const body = {
    model, messages, stream: true, return_progress: true, stream_options: { include_usage: true },
  };
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal,
    });
  } catch (error) {
    throw error.name === "AbortError" ? error : unreachable();
  }
  if (!response.ok) throw await failure(response);
  on.opened({
    droppedMessages: Number(response.headers.get("X-Context-Dropped-Messages") || 0),
    droppedTools: Number(response.headers.get("X-Context-Dropped-Tools") || 0),
  });
  const end = { usage: null, timings: null, finishReason: null };
  try {
    for await (const event of events(response.body)) {
      if (event.error) throw explain(event.error, 0, null);
      if (event.queue) on.queued(event.queue);
      if (event.prompt_progress) on.reading(event.prompt_progress);
      const choice = event.choices?.[0];
      if (choice?.delta?.content) on.text(choice.delta.content);
      if (choice?.finish_reason) end.finishReason = choice.finish_reason;
      if (event.timings) end.timings = event.timings;
      if (event.usage) end.usage = event.usage;
    }
  } catch (error) {
    if (error instanceof ChatError || error.name === "AbortError") throw error;
    throw new ChatError("The answer was cut off.", "The connection to the service was lost.");
  }
  on.finished(end);
}
