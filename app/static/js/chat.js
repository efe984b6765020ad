// The chat page: a conversation sent whole to /v1/chat/completions with every message (the service keeps no
// state), answers streamed in, the card's progress in the panel (card.js), an API key when the service asks.
// The conversation is kept in this browser (localStorage) so that a reload or a closed tab does not lose it;
// "New chat" forgets it.

import { apiKey, ChatError, countTokens, health, modelName, stored, streamChat } from "./api.js";
import { CardPanel } from "./card.js";
import { ready as markdownReady, render } from "./markdown.js";

const SYSTEM_STORAGE = "qwen-chat.system";
const CONVERSATION_STORAGE = "qwen-chat.conversation";
const $ = (id) => document.getElementById(id);
const ui = {
  conversation: $("conversation"), welcome: $("welcome"), composer: $("composer"), message: $("message"),
  send: $("send"), stop: $("stop"), system: $("system"), newChat: $("new-chat"), model: $("model"),
  health: $("health"), keyDialog: $("key-dialog"), keyForm: $("key-form"), key: $("key"), keyError: $("key-error"),
};

const card = new CardPanel();
let model = "qwen2.5";        // the served name replaces the alias once /v1/models answers
let history = [];             // the turns sent with the next message: {role, content, element}
let running = null;           // the AbortController of the request in flight
let chat = 0;                 // which conversation: "New chat" while an answer streams leaves that answer behind
// The runner hands out its answer a few tokens at a time (the page's data-chunk, as the service says it) and each
// piece comes as one chunk of the stream: counting chunks gives the speed while answering, whatever the text.
// Measured again after every answer from its exact token count.
let tokensPerChunk = Number(document.body.dataset.chunk) || 3;

// -- the conversation ---------------------------------------------------------------------------------------
function nearEnd() {
  const c = ui.conversation;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
}

function scrollToEnd() {
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function addTurn(role) {
  const element = document.createElement("article");
  element.className = `turn ${role}`;
  element.setAttribute("aria-label", role === "user" ? "Your message" : "Answer");
  const who = document.createElement("p");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Qwen";
  const body = document.createElement("div");
  body.className = "text";
  const footer = document.createElement("div");
  footer.className = "turn-footer";
  element.append(who, body, footer);
  ui.welcome.hidden = true;
  ui.conversation.append(element);
  scrollToEnd();
  return { element, body, footer };
}

function note(turn, text) {
  const line = document.createElement("p");
  line.className = "note";
  line.textContent = text;
  turn.footer.append(line);
}

function showError(turn, error) {
  const box = document.createElement("div");
  box.className = "turn-error";
  box.setAttribute("role", "alert");
  const title = document.createElement("strong");
  title.textContent = error.title;
  box.append(title);
  if (error.detail) box.append(" ", error.detail);
  turn.footer.append(box);
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // Denied: fall back to the selection below.
    }
  }
  // Plain http to a Pi on the local network is not a secure context: no clipboard API there.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "visually-hidden";
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  return copied;
}

function copyButton(label, name, text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy quiet";
  button.textContent = label;
  button.setAttribute("aria-label", name);
  button.addEventListener("click", async () => {
    const copied = await copyText(text());
    button.textContent = copied ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = label; }, 1500);
  });
  return button;
}

function finishAnswer(turn, text) {
  render(turn.body, text);
  turn.body.classList.remove("pending"); // an empty answer too
  turn.body.removeAttribute("aria-busy");
  for (const pre of turn.body.querySelectorAll("pre")) {
    const wrap = document.createElement("div");
    wrap.className = "code";
    pre.replaceWith(wrap);
    wrap.append(copyButton("Copy", "Copy code", () => pre.textContent), pre);
  }
  turn.footer.prepend(copyButton("Copy", "Copy answer", () => text));
}

// An answer that came (whole, or up to a stop or a failure) is part of the conversation.
function keepAnswer(turn, text) {
  finishAnswer(turn, text);
  history.push({ role: "assistant", content: text, element: turn.element });
}

// The oldest `count` turns of a request were left out to fit the window: mark them so.
function markLeftOut(sent, count) {
  for (const turn of history) turn.element.classList.remove("left-out");
  for (const turn of sent.slice(0, count)) turn.element.classList.add("left-out");
}

// What the next message would be sent with, kept for the next visit. Saved only when no answer is on its way:
// a reload while one streams comes back to the conversation as it was before that message.
function saveConversation() {
  stored.set(CONVERSATION_STORAGE, history.length ? JSON.stringify(asMessages(history)) : "");
}

function savedConversation() {
  try {
    const saved = JSON.parse(stored.get(CONVERSATION_STORAGE) || "[]");
    if (!Array.isArray(saved)) return [];
    return saved.filter((turn) => (turn?.role === "user" || turn?.role === "assistant")
      && typeof turn.content === "string");
  } catch {
    return [];  // not ours, or damaged: start afresh
  }
}

// The turns come back at once, in order; answers are rendered as Markdown once the libraries are in.
function restoreConversation() {
  const answers = [];
  for (const { role, content } of savedConversation()) {
    const turn = addTurn(role);
    if (role === "user") turn.body.textContent = content;
    else answers.push([turn, content]);
    history.push({ role, content, element: turn.element });
  }
  markdownReady.then(() => {
    for (const [turn, content] of answers) finishAnswer(turn, content);
  });
}

// The window gauge for a conversation that came back: what it takes, as the tokenizer counts it. Unless a
// message went meanwhile (its own figures are newer), or the service cannot say (the gauge stays empty).
async function showWindowOfConversation() {
  if (!history.length) return;
  const mine = chat;
  try {
    const used = await countTokens([...systemMessages(), ...asMessages(history)]);
    if (mine === chat && card.phase === "idle") card.showWindow(used);
  } catch {
    // No count (a key not given yet, say): nothing to show.
  }
}

// Turns of the page as chat messages: what is sent, counted and kept.
function asMessages(turns) {
  return turns.map(({ role, content }) => ({ role, content }));
}

function systemMessages() {
  const system = ui.system.value.trim();
  return system ? [{ role: "system", content: system }] : [];
}

// A message that got no answer (stopped, refused, failed) is taken back: it is not sent with the next one, and
// its text returns to the message box to send again or change.
function withdraw(user) {
  history = history.filter((turn) => turn !== user);
  user.element.classList.add("withdrawn");
  note(user, "Not answered: not part of the conversation.");
  if (!ui.message.value.trim()) {
    ui.message.value = user.content;
    autosize();
  }
}

function setBusy(busy) {
  const focusWasOnButton = document.activeElement === ui.send || document.activeElement === ui.stop;
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.conversation.setAttribute("aria-busy", String(busy));
  if (focusWasOnButton) (busy ? ui.stop : ui.message).focus();
}

async function ask(user) {
  const answer = addTurn("assistant");
  answer.body.setAttribute("aria-busy", "true");
  answer.body.classList.add("pending");
  const sent = history.slice();
  const messages = [...systemMessages(), ...asMessages(sent)];
  const controller = new AbortController();
  const mine = chat;
  running = controller;
  setBusy(true);
  card.sending();
  let text = "";
  let chunks = 0;
  let firstTextAt = 0;
  let frame = 0;
  const draw = () => {
    frame = 0;
    const follow = nearEnd();
    render(answer.body, text);
    if (follow) scrollToEnd();
  };
  try {
    await streamChat({
      model, messages, signal: controller.signal,
      on: {
        opened: ({ droppedMessages, droppedTools }) => {
          card.leftOut(droppedMessages, droppedTools);
          markLeftOut(sent, droppedMessages);
        },
        queued: (queue) => card.queued(queue),
        reading: (progress) => card.reading(progress),
        text: (piece) => {
          if (!text) {
            firstTextAt = performance.now();
            answer.body.classList.remove("pending");
          }
          text += piece;
          chunks += 1;
          // Tokens since the first chunk arrived, over the time since then.
          card.answering(chunks * tokensPerChunk, (chunks - 1) * tokensPerChunk, performance.now() - firstTextAt);
          if (!frame) frame = requestAnimationFrame(draw);
        },
        finished: (end) => {
          card.finished(end);
          if (end.usage?.completion_tokens && chunks) tokensPerChunk = end.usage.completion_tokens / chunks;
        },
      },
    });
    cancelAnimationFrame(frame);
    await markdownReady;
    if (mine !== chat) return;
    keepAnswer(answer, text);
  } catch (error) {
    cancelAnimationFrame(frame);
    if (mine !== chat) return;
    const stopped = error.name === "AbortError";
    if (stopped) card.stopped();
    else card.failed(error instanceof ChatError ? error : new ChatError("Something went wrong.", String(error)));
    if (!stopped && (!error.status || error.status >= 500)) showHealth(); // the card or the service may be down
    if (error instanceof ChatError && error.needsKey) {
      answer.element.remove();
      running = null;
      setBusy(false);
      // The message stays in the conversation while the key is asked for (nothing is saved meanwhile).
      if (await askForKey("The service did not accept the key. Enter it again.")) return ask(user);
      withdraw(user);
      return;
    }
    if (text) {
      // What came before the stop or the failure stays: the person saw it, and the model may build on it.
      keepAnswer(answer, text);
    } else {
      answer.body.hidden = true; // nothing to show but what happened, below
      withdraw(user);
    }
    if (stopped) note(answer, "Stopped.");
    else showError(answer, error);
    answer.element.scrollIntoView({ block: "end" });
  } finally {
    if (running === controller) {
      running = null;
      setBusy(false);
    }
    if (mine === chat && !running) saveConversation(); // not while a retry with a new key is on its way
  }
}

function send() {
  const content = ui.message.value.trim();
  if (running || !content) return;
  const user = { role: "user", content, ...addTurn("user") };
  user.body.textContent = content;
  history.push(user);
  ui.message.value = "";
  autosize();
  ask(user);
}

function stop() {
  if (running) running.abort();
  ui.message.focus();
}

function newChat() {
  if (running) {
    running.abort();
    running = null;
    setBusy(false);
  }
  chat += 1;
  history = [];
  saveConversation();
  for (const turn of ui.conversation.querySelectorAll(".turn")) turn.remove();
  ui.welcome.hidden = false;
  card.reset();
  ui.message.focus();
}

function autosize() {
  ui.message.style.height = "auto";
  ui.message.style.height = `${Math.min(ui.message.scrollHeight, Math.max(80, window.innerHeight * 0.25))}px`;
}

// -- the API key --------------------------------------------------------------------------------------------
let keyAnswer = null; // resolves the pending askForKey()

function askForKey(reason) {
  ui.keyError.textContent = reason || "";
  ui.keyError.hidden = !reason;
  ui.key.value = "";
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.key.focus();
  return new Promise((resolve) => { keyAnswer = resolve; });
}

async function submitKey(event) {
  event.preventDefault();
  const key = ui.key.value.trim();
  if (!key) return;
  try {
    const name = await modelName(key);
    apiKey.set(key);
    showModel(name);
    const answer = keyAnswer;
    keyAnswer = null;
    ui.keyDialog.close();
    answer?.(true);
  } catch (error) {
    ui.keyError.textContent = error.needsKey ? "That key was not accepted. Check it and try again."
      : `${error.title} ${error.detail || ""}`;
    ui.keyError.hidden = false;
    ui.key.select();
  }
}

// -- the service --------------------------------------------------------------------------------------------
function showModel(name) {
  if (name) {
    model = name;
    ui.model.textContent = name;
  }
}

let healthTimer = 0;

// The card's state in the header, looked at again every 5 s until it is ready.
async function showHealth() {
  clearTimeout(healthTimer);
  let text;
  let status = "unavailable";
  try {
    const { status: state, details = {} } = await health();
    status = state;
    if (state === "ok") text = details.npu === "emulated" ? "Emulated card" : "Card ready";
    else if (state === "loading") text = `Card loading${details.progress ? ` (${details.progress.step}/${details.progress.total})` : ""}`;
    else text = `Card unavailable${details.reason ? `: ${details.reason}` : ""}`;
  } catch {
    text = "Service unreachable";
  }
  ui.health.textContent = text;
  ui.health.title = status === "ok" && text === "Emulated card"
    ? "No NPU card here: answers come from the emulated runner, at the card's pace." : text;
  ui.health.dataset.status = status;
  if (status !== "ok") healthTimer = setTimeout(showHealth, 5000);
}

async function start() {
  ui.system.value = stored.get(SYSTEM_STORAGE);
  card.reset();
  restoreConversation();
  showHealth();
  try {
    showModel(await modelName());
    showWindowOfConversation();
  } catch (error) {
    if (!error.needsKey) return;
    const reason = apiKey.get() ? "The saved key is no longer accepted. Enter the current one." : "";
    if (await askForKey(reason)) showWindowOfConversation(); // the count needed the key too
  }
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.message.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter is a new line; Enter that confirms an input method's composition is neither.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.message.addEventListener("input", autosize);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && running && !ui.keyDialog.open) stop();
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.system.addEventListener("input", () => stored.set(SYSTEM_STORAGE, ui.system.value));
ui.keyForm.addEventListener("submit", submitKey);
ui.keyDialog.addEventListener("close", () => {
  // Closed without a key that worked (Escape): the message waiting for it is not sent.
  const answer = keyAnswer;
  keyAnswer = null;
  answer?.(false);
});

start();
