"use strict";
/* The page at the server's "/": a text that GPT-2 continues, through the server's own
   /v1/completions (streamed), with the server's state from /health and /metrics. Every address
   is relative, so that the page also works where a proxy serves the server under a path (Colab). */

const ALTERNATIVES = 5; // the likeliest tokens the server sends for each place (logprobs)
const POLL_SECONDS = 3;
const KEY = "gpt2-api-key"; // the API key's name in session storage

const $ = (id) => document.getElementById(id);
const editor = $("text");
const choicesBox = $("choices");
const keyDialog = $("key-dialog");
const tip = $("tip");

let running = null; // the AbortController of the generation under way
let pollTimer = null;
let keyDeclined = false; // the person cancelled the key's dialog: polling does not ask again

// Talking to the server -------------------------------------------------------------------

/** An error the server answered, in words for the person. */
class ServerError extends Error {}

function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = key ? { ...options.headers, Authorization: `Bearer ${key}` } : options.headers;
  return fetch(path, { ...options, headers });
}

/** The ServerError that a response other than 200 means. */
async function failure(response) {
  if (response.status === 401) {
    askForKey();
    return new ServerError("The server needs its API key: enter it, then try again.");
  }
  if (response.status === 429) {
    const after = response.headers.get("Retry-After");
    return new ServerError(`The server is busy: try again in ${after ? `${after} s` : "a moment"}.`);
  }
  try {
    return new ServerError((await response.json()).error.message);
  } catch {
    return new ServerError(`The server answered ${response.status} ${response.statusText}.`);
  }
}

/** The JSON of each server-sent event's `data:` line, until `data: [DONE]`. */
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop(); // the start of an event still coming
    for (const line of events.flatMap((event) => event.split("\n"))) {
      if (!line.startsWith("data: ")) continue;
      const data = line.slice("data: ".length);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// Generating ------------------------------------------------------------------------------

/** The completions request that the text and the settings make. */
function completionRequest() {
  const request = { prompt: editor.textContent, stream: true, logprobs: ALTERNATIVES, n: 1 };
  for (const input of $("settings").querySelectorAll("input[type=number]")) {
    if (input.value !== "") request[input.name] = Number(input.value);
  }
  const stop = stopStrings($("stop-strings").value);
  if (stop.length) request.stop = stop;
  return request;
}

/** "\n\n,The end" → ["\n\n", "The end"]: commas separate, a backslash escapes (\n a new line, \t a tab, \, a comma). */
function stopStrings(text) {
  const escapes = { n: "\n", t: "\t" };
  return (text.match(/(?:\\.|[^,\\])+/g) ?? []).map((part) => part.replace(/\\(.)/g, (_, c) => escapes[c] ?? c));
}

async function generate() {
  if (running) return;
  const request = completionRequest();
  hideError();
  hideTip();
  choicesBox.replaceChildren();
  running = new AbortController();
  setRunning(true);
  const started = performance.now();
  let tokens = 0;
  try {
    const response = await api("v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
      signal: running.signal,
    });
    if (!response.ok) throw await failure(response);
    // One choice streams into the text itself; several into cards side by side, to pick from.
    const outputs = request.n > 1 ? choiceCards(request.n) : [editor];
    const choices = outputs.map((element) => ({ element, chars: 0, last: null }));
    for await (const event of serverSentEvents(response)) {
      if (event.error) throw new ServerError(event.error.message); // it failed after the stream began
      for (const piece of event.choices) tokens += append(choices[piece.index], piece);
      showSpeed(tokens, started);
    }
    showSpeed(tokens, started);
  } catch (error) {
    if (error.name === "AbortError") showSpeed(tokens, started, " (stopped)");
    else showError(error);
  } finally {
    running = null;
    setRunning(false);
  }
  if (request.n <= 1) caretAtEnd();
}

/** Stop: closing the stream ends the request, and the server frees its row. */
function stop() {
  running?.abort();
}

function setRunning(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
  editor.contentEditable = on ? "false" : "plaintext-only";
  for (const button of choicesBox.querySelectorAll("button")) button.disabled = on;
}

/** n > 1: a card for each choice, side by side, each with a button that adds it to the text.
    Returns the elements that the choices' tokens go into. */
function choiceCards(n) {
  const outputs = [];
  const cards = Array.from({ length: n }, (_, i) => {
    const text = document.createElement("div");
    text.className = "choice-text";
    const use = document.createElement("button");
    use.type = "button";
    use.textContent = `Use choice ${i + 1}`;
    use.disabled = true; // until the choices are complete (setRunning)
    use.addEventListener("click", () => {
      editor.append(...text.childNodes);
      choicesBox.replaceChildren();
      caretAtEnd();
    });
    const card = document.createElement("article");
    card.className = "choice";
    card.append(use, text);
    outputs.push(text);
    return card;
  });
  choicesBox.replaceChildren(...cards);
  return outputs;
}

/** Adds a streamed piece of a choice's text, one span for each of its tokens. Text before the
    piece's first token belongs to the token before it (the server holds back text that could begin
    a stop string). Returns how many tokens it added. */
function append(choice, { text, logprobs }) {
  const chars = Array.from(text); // offsets count characters (code points), as the server's Python does
  const starts = logprobs.text_offset.map((offset) => offset - choice.chars);
  const lead = chars.slice(0, starts[0] ?? chars.length).join("");
  if (lead && choice.last) {
    choice.last.textContent += lead;
    choice.last.dataset.text = choice.last.textContent;
  } else if (lead) {
    choice.element.append(lead);
  }
  starts.forEach((start, i) => {
    const piece = chars.slice(start, starts[i + 1] ?? chars.length).join("");
    choice.last = tokenSpan(piece, logprobs.tokens[i], logprobs.token_logprobs[i], logprobs.top_logprobs[i]);
    choice.element.append(choice.last);
  });
  choice.chars += chars.length;
  return starts.length;
}

function tokenSpan(text, token, logprob, top) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = text;
  span.dataset.text = text; // to tell when the person edits it
  span.dataset.token = token; // the token as the server names it ("bytes:\xe2" for part of a character)
  span.dataset.logprob = logprob;
  span.dataset.top = JSON.stringify(top); // its place's likeliest tokens: {token: logprob}
  span.style.setProperty("--p", Math.exp(logprob));
  return span;
}

// Editing ---------------------------------------------------------------------------------

/** A token the person changed is theirs now: plain text, without the model's colour and numbers.
    Typing just after a token lands inside its span, so what follows the token's own text moves out. */
function settleEditedTokens() {
  for (const span of editor.querySelectorAll(".token")) {
    const original = span.dataset.text;
    const now = span.textContent;
    if (now === original) continue;
    const caret = caretOffset(span);
    const typedAfter = original !== "" && now.startsWith(original);
    const plain = document.createTextNode(typedAfter ? now.slice(original.length) : now);
    if (typedAfter) {
      span.textContent = original;
      span.after(plain);
    } else {
      span.replaceWith(plain);
    }
    if (caret !== null) getSelection().collapse(plain, Math.max(0, caret - (typedAfter ? original.length : 0)));
  }
}

/** The caret's place in a span's text, or null where it is not in the span. */
function caretOffset(span) {
  const selection = getSelection();
  if (!selection.rangeCount || !span.contains(selection.focusNode)) return null;
  const range = document.createRange();
  range.selectNodeContents(span);
  range.setEnd(selection.focusNode, selection.focusOffset);
  return range.toString().length;
}

function caretAtEnd() {
  editor.focus();
  getSelection().selectAllChildren(editor);
  getSelection().collapseToEnd();
}

// Probabilities ---------------------------------------------------------------------------

function showTip(span) {
  const chosen = document.createElement("div");
  chosen.append("Chosen: ");
  tokenLine(chosen, span.dataset.token, Number(span.dataset.logprob));
  const list = document.createElement("ol");
  // Sorted here: a JSON object's keys that look like numbers ("1", "42") come first in JavaScript.
  const top = Object.entries(JSON.parse(span.dataset.top)).sort((a, b) => b[1] - a[1]);
  for (const [token, logprob] of top) {
    const item = tokenLine(document.createElement("li"), token, logprob);
    item.classList.toggle("chosen", token === span.dataset.token);
    list.append(item);
  }
  tip.replaceChildren(chosen, "Likeliest here:", list);
  tip.hidden = false;
  const box = span.getBoundingClientRect();
  tip.style.left = `${scrollX + Math.max(0, Math.min(box.left, innerWidth - tip.offsetWidth - 8))}px`;
  tip.style.top = `${scrollY + box.bottom + 4}px`;
}

function hideTip() {
  tip.hidden = true;
}

/** Appends "␣the 12.3%" to `element`: a token with its spaces and new lines visible, kept apart
    from the text around it (it may be written right to left), and its probability. */
function tokenLine(element, token, logprob) {
  const name = document.createElement("bdi");
  name.textContent = token.replaceAll(" ", "␣").replaceAll("\n", "↵").replaceAll("\t", "⇥");
  element.append(name, ` ${percent(logprob)}`);
  return element;
}

function percent(logprob) {
  const p = 100 * Math.exp(logprob);
  return `${p < 0.1 ? p.toPrecision(1) : p.toFixed(1)}%`;
}

// The server's state, messages and the API key ---------------------------------------------

/** Polls /health (open to all) and /metrics: loading, ready, busy, or the connection lost. */
async function refreshState() {
  try {
    const health = await fetch("health");
    if (health.status === 503) {
      const { error } = await health.json();
      if (error.code === "loading") setState("loading", "loading the model");
      else setState("failed", error.message);
      return;
    }
    const response = await api("metrics");
    if (response.status === 401) {
      setState("key", "API key needed");
      if (!keyDeclined) askForKey();
      return;
    }
    const metrics = parseMetrics(await response.text());
    if (!$("model-name").textContent) await showModelName();
    const inUse = metrics.gpt2_rows_in_use;
    const waiting = metrics.gpt2_requests_waiting;
    if (inUse || waiting) setState("busy", `busy: ${inUse} of ${metrics.gpt2_rows} rows in use, ${waiting} waiting`);
    else setState("ready", "ready");
  } catch {
    setState("offline", "connection lost");
  } finally {
    clearTimeout(pollTimer);
    pollTimer = setTimeout(refreshState, POLL_SECONDS * 1000);
  }
}

/** Prometheus' text format: {name: value} of its unlabelled lines. */
function parseMetrics(text) {
  const metrics = {};
  for (const line of text.split("\n")) {
    const [name, value] = line.split(" ");
    if (name && !name.startsWith("#")) metrics[name] = Number(value);
  }
  return metrics;
}

async function showModelName() {
  const response = await api("v1/models");
  if (!response.ok) return;
  const [model] = (await response.json()).data;
  $("model-name").textContent = model.id;
  document.title = `GPT-2 ${model.id}`;
}

function setState(state, words) {
  $("state").dataset.state = state;
  $("state").textContent = words;
}

function showSpeed(tokens, started, ending = "") {
  const seconds = (performance.now() - started) / 1000;
  const speed = seconds > 0 ? tokens / seconds : 0;
  $("speed").textContent = `${tokens} tokens in ${seconds.toFixed(1)} s, ${speed.toFixed(1)} tokens/s${ending}`;
}

function showError(error) {
  // fetch and its stream fail with a TypeError when the connection does.
  $("error").textContent = error instanceof ServerError ? error.message
    : error instanceof TypeError ? "Connection lost: the server does not answer. Is it still running?"
      : `Something went wrong: ${error.message}`;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function askForKey() {
  if (keyDialog.open) return;
  keyDeclined = false;
  keyDialog.returnValue = "";
  $("key").value = sessionStorage.getItem(KEY) ?? "";
  keyDialog.showModal();
}

function keyGiven() {
  if (keyDialog.returnValue !== "ok") {
    keyDeclined = true;
    return;
  }
  sessionStorage.setItem(KEY, $("key").value);
  $("model-name").textContent = "";
  refreshState();
}

// Wiring ----------------------------------------------------------------------------------

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", stop);
$("settings").addEventListener("submit", (event) => {
  event.preventDefault(); // Enter in a setting generates
  generate();
});
$("by-probability").addEventListener("change", (event) => {
  document.body.classList.toggle("by-probability", event.target.checked);
});
editor.addEventListener("input", settleEditedTokens);
keyDialog.addEventListener("close", keyGiven);
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    generate();
  } else if (event.key === "Escape" && running) {
    event.preventDefault();
    stop();
  }
});
// Hovering a token shows its probabilities; so does tapping it, on a phone.
for (const type of ["mouseover", "click"]) {
  document.addEventListener(type, (event) => {
    const span = event.target.closest(".token");
    if (span) showTip(span);
    else hideTip();
  });
}

refreshState();
editor.focus();
