// The panel above the message box: what the card is doing for this page's request (waiting in the queue,
// reading the prompt, answering), what it cost afterwards, and how much of the window the conversation uses.
// Everything comes from the stream's progress chunks (docs/API.md, "Progress") and its response headers.

// The card's window in tokens, as the service says it (the page's data-window), until a progress chunk says otherwise.
const WINDOW = Number(document.body.dataset.window) || 1024;

const $ = (id) => document.getElementById(id);

function seconds(ms) {
  const s = ms / 1000;
  return s < 10 ? `${s.toFixed(1)} s` : `${Math.round(s)} s`;
}

function plural(n, one, many = `${one}s`) {
  return `${n} ${n === 1 ? one : many}`;
}

function rate(perSecond) {
  return perSecond ? `${perSecond.toFixed(1)} tokens/s` : "";
}

export class CardPanel {
  constructor() {
    this.state = $("card-state");
    this.bar = $("prompt-progress");
    this.detail = $("card-detail");
    this.gauge = $("window-gauge");
    this.gaugeText = $("window-text");
    this.gaugeFull = $("window-full");
    this.dropped = $("dropped");
    this.window = WINDOW;
    this.phase = "idle";
    this.promptTokens = 0; // of the request in flight, once the card reads it
  }

  // The live region is read out when the phase changes, not on every half-second update of the numbers.
  setPhase(phase, sentence) {
    this.phase = phase;
    if (this.state.textContent !== sentence) this.state.textContent = sentence;
  }

  reset() {
    this.setPhase("idle", "Ready.");
    this.bar.hidden = true;
    this.detail.textContent = "";
    this.dropped.hidden = true;
    this.showWindow(0);
  }

  sending() {
    this.setPhase("sending", "Sending…");
    this.bar.hidden = true;
    this.detail.textContent = "";
    this.dropped.hidden = true; // said of the last request; this one's comes when it opens
    this.promptTokens = 0;
  }

  // `queue`: {position: requests the card takes first, request_class, waiting: {interactive, background}}.
  queued({ position, request_class: requestClass, waiting }) {
    const ahead = position === 0 ? "you are next" : `${plural(position, "request")} ahead of you`;
    this.setPhase("queued", `Waiting in the queue for the card: ${ahead}.`);
    this.bar.hidden = true;
    const people = waiting?.interactive ?? 0;
    const background = waiting?.background ?? 0;
    const kind = requestClass === "background" ? "background work (people go first)" : "a person's message";
    this.detail.textContent = `The card is busy with another request. Waiting: ${plural(people, "message")} from ` +
      `people, ${plural(background, "background task")}. Yours counts as ${kind}.`;
  }

  // llama.cpp's prompt_progress plus ours: {total, processed, time_ms, remaining_ms, estimated, window}.
  reading(progress) {
    this.window = progress.window || this.window;
    const { total, processed } = progress;
    this.setPhase("reading", "The card is reading your conversation.");
    this.bar.hidden = false;
    this.bar.max = total;
    this.bar.value = processed;
    const left = progress.estimated
      ? `about ${seconds(progress.remaining_ms)} left (an estimate from the card's pace)`
      : `done in ${seconds(progress.time_ms)}`;
    this.detail.textContent = `${processed} of ${total} tokens read, ${left}.`;
    this.promptTokens = total;
    this.showWindow(total);
  }

  // While the answer streams: tokens so far and the speed (estimates until the end: `since` tokens came in the
  // `elapsedMs` after the first chunk).
  answering(answerTokens, since, elapsedMs) {
    this.setPhase("answering", "The card is answering.");
    this.bar.hidden = true;
    const speed = elapsedMs >= 500 ? `, about ${rate((since * 1000) / elapsedMs)}` : "";
    this.detail.textContent = `About ${plural(Math.round(answerTokens), "token")} so far${speed}.`;
    this.showWindow(this.promptTokens + Math.round(answerTokens));
  }

  finished({ usage, timings, finishReason }) {
    const cut = finishReason === "length" ? " The answer reached its length limit." : "";
    this.setPhase("done", `Done.${cut}`);
    this.bar.hidden = true;
    const parts = [];
    if (timings) {
      parts.push(`Prompt: ${plural(timings.prompt_n, "token")} in ${seconds(timings.prompt_ms)}` +
        (timings.prompt_per_second ? ` (${rate(timings.prompt_per_second)})` : ""));
      parts.push(`answer: ${plural(timings.predicted_n, "token")} in ${seconds(timings.predicted_ms)}` +
        (timings.predicted_per_second ? ` (${rate(timings.predicted_per_second)})` : ""));
    } else if (usage) {
      parts.push(`Prompt: ${plural(usage.prompt_tokens, "token")}`, `answer: ${plural(usage.completion_tokens, "token")}`);
    }
    this.detail.textContent = parts.length ? `${parts.join("; ")}.` : "";
    if (usage) this.showWindow(usage.prompt_tokens + usage.completion_tokens);
  }

  stopped() {
    this.setPhase("stopped", "Stopped. The card is free for the next message.");
    this.bar.hidden = true;
    this.detail.textContent = "";
  }

  failed(error) {
    this.setPhase("error", error.title);
    this.bar.hidden = true;
    this.detail.textContent = "";
  }

  // Tokens of the window the conversation now takes (prompt and answer); nearly full means older turns go next.
  showWindow(used) {
    this.gauge.max = this.window;
    this.gauge.low = Math.round(this.window / 2);
    this.gauge.high = Math.round(this.window * 0.75);
    this.gauge.value = Math.min(used, this.window);
    this.gaugeText.textContent = `${used} of ${this.window} tokens`;
    this.gaugeFull.textContent = used >= this.gauge.high ? "Nearly full: the oldest turns will be left out next." : "";
  }

  // What the service left out of this request to fit the window (X-Context-Dropped-* headers).
  leftOut(messages, tools) {
    if (!messages && !tools) {
      this.dropped.hidden = true;
      return;
    }
    const oldest = messages === 1 ? "the oldest message" : `the ${messages} oldest messages`;
    const what = [messages && oldest, tools && plural(tools, "tool definition")].filter(Boolean).join(" and ");
    const one = messages + tools === 1;
    this.dropped.textContent = `To fit the card's ${this.window}-token window, ${what} ${one ? "was" : "were"} ` +
      `left out: the model did not see ${one ? "it" : "them"}.`;
    this.dropped.hidden = false;
  }
}
