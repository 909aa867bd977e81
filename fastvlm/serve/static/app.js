// The page's behaviour: one image, a conversation about it, answers streamed from the server.
//
// Why it is shaped this way:
// - The server keeps no conversation state (OpenAI's API is stateless), so the page keeps the
//   message history and resends all of it each turn, the image in the first user turn
//   (image part before text: the "<image>\n{question}" layout the model was trained on).
//   FastVLM was trained on one image per prompt, so the image is fixed once a conversation starts.
// - Answers stream as server-sent events over a POST, which EventSource cannot send; the body is
//   read with a ReadableStream reader, and SSEParser reassembles events that arrive split across
//   network chunks (or several in one chunk). TextDecoder's stream mode does the same for UTF-8
//   characters split across chunks.
// - Every failure becomes one readable sentence in #error: OpenAI-shaped JSON error bodies,
//   other JSON, HTML from a proxy, a dropped connection, an error event inside the stream.
//   A failed turn is taken back out of the history, and its question is put back in the box.
// - SSEParser and the error/stat formatters are exported so tests can call them in the browser.

const $ = (id) => document.getElementById(id);

/** Server-sent events, fed decoded text as it arrives; yields the `data` of each complete event. */
export class SSEParser {
  #buffer = "";
  #data = [];

  /** Add `text`; returns the data strings of the events it completed (possibly none). */
  push(text) {
    return this.#lines(this.#buffer + text, true);
  }

  /** The stream has ended: a "\r" held back at the very end was a line end after all. */
  end() {
    return this.#lines(this.#buffer, false);
  }

  #lines(pending, more) {
    // A line may end in "\r\n": a trailing "\r" waits for the next chunk to say which it is.
    const heldBack = more && pending.endsWith("\r") ? "\r" : "";
    if (heldBack) pending = pending.slice(0, -1);
    const lines = pending.split(/\r\n|\r|\n/);
    this.#buffer = lines.pop() + heldBack; // the last piece is an unfinished line
    const events = [];
    for (const line of lines) {
      if (line === "") {
        // A blank line ends an event (an event without data lines is nothing).
        if (this.#data.length) events.push(this.#data.join("\n"));
        this.#data = [];
      } else if (!line.startsWith(":")) {
        // "field: value" ("data:x" and "data: x" are the same); comments start with ":".
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") this.#data.push(value);
      }
    }
    return events;
  }
}

/** A failure the server reported, already phrased for people. */
class ServerError extends Error {}

/** The message inside an error body: OpenAI's {"error": {"message"}}, or FastAPI's {"detail"}. */
export function errorText(body) {
  if (body === null || typeof body !== "object") return null;
  const error = body.error;
  if (error && typeof error === "object" && typeof error.message === "string") return error.message;
  if (typeof error === "string") return error;
  if (typeof body.detail === "string") return body.detail;
  if (Array.isArray(body.detail)) {
    return body.detail.map((item) => (item && typeof item.msg === "string" ? item.msg : JSON.stringify(item))).join("; ");
  }
  return null;
}

/** One sentence for a non-2xx response, whatever its body is. */
export function describeFailure(status, statusText, bodyText, retryAfter) {
  let message = null;
  let type = null;
  try {
    const body = JSON.parse(bodyText);
    message = errorText(body);
    if (body && body.error && typeof body.error.type === "string") type = body.error.type;
  } catch {
    // not JSON (a proxy's HTML page, plain text): fall back to its text below
  }
  if (message === null) {
    const plain = bodyText.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim();
    message = plain ? plain.slice(0, 300) : statusText || "no details given";
  }
  const where = [`HTTP ${status}`, type].filter(Boolean).join(", ");
  const retry = retryAfter ? ` Try again in ${retryAfter} s.` : "";
  return `${message} (${where}).${retry}`;
}

function milliseconds(value) {
  return `${value >= 10 ? Math.round(value) : value.toFixed(1)} ms`;
}

/** The figures shown under an answer: [label, value] pairs; a field the server left out is skipped. */
export function formatStats(timings, usage) {
  const number = (value) => typeof value === "number" && Number.isFinite(value);
  const stats = [];
  const t = timings ?? {};
  const cached = usage?.prompt_tokens_details?.cached_tokens;
  if (number(t.ttft_ms)) stats.push(["TTFT", milliseconds(t.ttft_ms)]);
  if (number(t.vision_ms)) stats.push(["Vision", milliseconds(t.vision_ms) + (t.vision_ms === 0 && cached ? " (cached)" : "")]);
  if (number(t.prefill_ms)) stats.push(["Prefill", milliseconds(t.prefill_ms)]);
  if (number(t.decode_tokens_per_s)) stats.push(["Decode", `${t.decode_tokens_per_s.toFixed(1)} tokens/s`]);
  if (usage && number(usage.prompt_tokens) && number(usage.completion_tokens)) {
    stats.push(["Tokens", `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion`]);
  }
  return stats;
}

// --------------------------------------------------------------------------- page state

const state = {
  history: [], // OpenAI messages sent so far, answers included
  image: null, // {url: "data:...", name} for the first turn
  model: null, // id from GET v1/models; omitted from requests while unknown
  controller: null, // AbortController of the answer being streamed
  turns: 0, // numbers the per-turn element ids: question-N, answer-N, timings-N
  conversation: 0, // bumped by "New conversation", so a turn it cut short leaves the new one alone
};

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

async function loadModel() {
  const output = $("model");
  try {
    const response = await fetch("v1/models", { headers: authHeaders() });
    const text = await response.text();
    if (!response.ok) {
      state.model = null;
      output.textContent = response.status === 401 ? "needs an API key (see Settings)" : "unknown";
      if (response.status === 401) $("settings").open = true;
      else showError(`Could not list the models: ${describeFailure(response.status, response.statusText, text)}`);
      return;
    }
    state.model = JSON.parse(text).data?.[0]?.id ?? null;
    output.textContent = state.model ?? "none listed";
  } catch (error) {
    output.textContent = "unknown";
    showError(`Could not reach the server (${error.message}).`);
  }
}

// --------------------------------------------------------------------------- the image

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function useImage(file) {
  if (state.history.length) {
    showError("This conversation already has its image; start a new conversation to use another.");
    return;
  }
  if (!file.type.startsWith("image/")) {
    showError(`${file.name || "That file"} is not an image (${file.type || "unknown type"}).`);
    return;
  }
  clearError();
  state.image = { url: await readAsDataURL(file), name: file.name || "pasted image" };
  $("thumbnail").src = state.image.url;
  $("thumbnail").alt = `Selected image: ${state.image.name}`;
  $("image-name").textContent = `${state.image.name} (${Math.ceil(file.size / 1024)} KiB)`;
  $("preview").hidden = false;
  $("remove-image").hidden = false;
}

function removeImage() {
  state.image = null;
  $("image-input").value = "";
  $("thumbnail").removeAttribute("src");
  $("preview").hidden = true;
  $("remove-image").hidden = true;
}

/** Once a conversation has started its image is part of the history and cannot change. */
function lockImage(locked) {
  $("image-input").disabled = locked;
  $("remove-image").hidden = locked || !state.image;
  $("image-locked").hidden = !locked || !state.image;
}

// --------------------------------------------------------------------------- a turn

function messageElement(role, id) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  item.id = id;
  $("messages").append(item);
  return item;
}

function renderQuestion(number, text, imageUrl) {
  const item = messageElement("user", `question-${number}`);
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "The image asked about";
    item.append(img);
  }
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  item.append(body);
  return item;
}

function renderStats(item, number, timings, usage) {
  const stats = formatStats(timings, usage);
  if (!stats.length) return;
  const list = document.createElement("dl");
  list.className = "timings";
  list.id = `timings-${number}`;
  for (const [label, value] of stats) {
    const term = document.createElement("dt");
    term.textContent = label;
    const detail = document.createElement("dd");
    detail.textContent = value;
    const pair = document.createElement("div"); // a dl may group each dt with its dd
    pair.append(term, detail);
    list.append(pair);
  }
  item.append(list);
}

function followIfAtBottom(wasAtBottom) {
  if (wasAtBottom) window.scrollTo(0, document.body.scrollHeight);
}

function atBottom() {
  return window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
}

/** Run a network step; its failure (not a stop by the user) becomes a ServerError saying `what`. */
async function network(what, step) {
  try {
    return await step();
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ServerError(`${what} (${error.message}).`);
  }
}

/** POST the history with stream: true; feed each delta to `onText`; resolve to {timings, usage}. */
async function streamAnswer(messages, signal, onText) {
  const body = {
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value) || 0,
    max_tokens: Math.max(1, Math.floor(Number($("max-tokens").value) || 256)),
  };
  if (state.model) body.model = state.model;
  const response = await network("Could not reach the server", () =>
    fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal,
    }),
  );
  if (!response.ok) {
    const text = await response.text();
    throw new ServerError(describeFailure(response.status, response.statusText, text, response.headers.get("Retry-After")));
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = new SSEParser();
  const result = { timings: null, usage: null };
  for (;;) {
    const { value, done } = await network("The connection broke while the answer streamed", () => reader.read());
    const text = done ? decoder.decode() : decoder.decode(value, { stream: true });
    const events = parser.push(text);
    if (done) events.push(...parser.end());
    for (const data of events) {
      if (data === "[DONE]") return result;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        throw new ServerError(`The server sent an event that is not JSON: ${data.slice(0, 100)}`);
      }
      const message = errorText(chunk);
      if (message !== null) throw new ServerError(`The answer stopped: ${message}`);
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) onText(choice.delta.content);
      if (chunk.timings) result.timings = chunk.timings;
      if (chunk.usage) result.usage = chunk.usage;
    }
    if (done) throw new ServerError("The answer stopped before the server finished it (the connection closed early).");
  }
}

async function ask(question) {
  const number = ++state.turns;
  const conversation = state.conversation;
  const first = state.history.length === 0;
  const imageUrl = first && state.image ? state.image.url : null;
  const content = imageUrl
    ? [
        { type: "image_url", image_url: { url: imageUrl } },
        { type: "text", text: question },
      ]
    : question;
  state.history.push({ role: "user", content });
  const questionItem = renderQuestion(number, question, imageUrl);
  const answerItem = messageElement("assistant", `answer-${number}`);
  const answerText = document.createElement("p");
  answerText.className = "text";
  answerItem.append(answerText);
  answerItem.dataset.state = "streaming";
  answerItem.setAttribute("aria-busy", "true"); // read out once complete, not token by token

  state.controller = new AbortController();
  setBusy(true);
  let answer = "";
  let result;
  try {
    result = await streamAnswer(state.history, state.controller.signal, (piece) => {
      const follow = atBottom();
      answer += piece;
      answerText.textContent = answer;
      followIfAtBottom(follow);
    });
  } catch (error) {
    if (conversation !== state.conversation) {
      // "New conversation" aborted this turn and has already cleared the page.
    } else if (error.name === "AbortError" && answer) {
      // Stopped by the user: keep what was shown, so the history matches the page.
      state.history.push({ role: "assistant", content: answer });
      answerItem.dataset.state = "stopped";
    } else {
      // Take the turn back: the question returns to the box, ready to send again.
      state.history.pop();
      questionItem.remove();
      answerItem.remove();
      if (!$("question").value) $("question").value = question;
      if (error.name !== "AbortError") {
        if (!(error instanceof ServerError)) console.error(error); // a bug here: keep its stack
        showError(error instanceof ServerError ? error.message : `Something went wrong in the page: ${error.message}`);
      }
    }
    return;
  } finally {
    answerItem.removeAttribute("aria-busy");
    state.controller = null;
    setBusy(false);
  }
  state.history.push({ role: "assistant", content: answer });
  answerItem.dataset.state = "done";
  renderStats(answerItem, number, result.timings, result.usage);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  lockImage(busy || state.history.length > 0);
}

function newConversation() {
  state.controller?.abort();
  state.conversation += 1;
  state.history = [];
  $("messages").replaceChildren();
  removeImage();
  lockImage(false);
  clearError();
  $("question").value = "";
  $("question").focus();
}

// --------------------------------------------------------------------------- wiring

function imageFrom(items) {
  for (const item of items ?? []) {
    const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
    if (file && file.type.startsWith("image/")) return file;
  }
  return null;
}

async function start() {
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.controller) return;
    const question = $("question").value.trim();
    if (!question) {
      showError("Type a question first.");
      $("question").focus();
      return;
    }
    clearError();
    $("question").value = "";
    ask(question);
  });
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-conversation").addEventListener("click", newConversation);
  $("remove-image").addEventListener("click", removeImage);
  $("image-input").addEventListener("change", () => {
    const file = $("image-input").files[0];
    if (file) useImage(file);
  });
  $("api-key").addEventListener("change", () => {
    clearError();
    loadModel();
  });

  // Drops anywhere on the page (a missed drop would otherwise make the browser open the file).
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    $("drop-zone").classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) $("drop-zone").classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    $("drop-zone").classList.remove("dragging");
    const files = event.dataTransfer?.files;
    if (!files?.length) return;
    const file = imageFrom(files);
    if (file) useImage(file);
    else showError(`${files[0].name} is not an image.`);
  });
  // Pasting an image anywhere; pasting text into the question box is left alone.
  document.addEventListener("paste", (event) => {
    const file = imageFrom(event.clipboardData?.items);
    if (file) {
      event.preventDefault();
      useImage(file);
    }
  });

  await loadModel();
  document.body.dataset.ready = "true"; // for tests: listeners attached, model id asked for
}

start();
