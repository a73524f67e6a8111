// The chat page: streams /v1/chat/completions over fetch() and renders model text as DOM text nodes.
// Its Completion mode (below, "completion mode") streams /v1/completions into a monospace text box.
// Safety rule: model (and server) text only ever reaches the page through textContent / text nodes,
// never as HTML, so markup in a reply is shown, not run.
"use strict";

(() => {
  const SETTINGS_KEY = "tinyserve.chat.settings"; // localStorage: nothing secret in it
  const API_KEY_KEY = "tinyserve.chat.apiKey"; // sessionStorage: dies with the tab
  const DEFAULTS = Object.freeze({
    system: "", temperature: 0.7, top_p: 1, max_tokens: 512, json: false, extra: "",
  });
  const NEAR_BOTTOM_PX = 80;

  const $ = (id) => document.getElementById(id);
  const ui = {};
  const state = {
    model: null,
    mode: "chat", // or "completion"; the server's /ui/config picks it at load, one click switches
    modeChosen: false, // the user switched: the server's choice no longer applies
    completion: null, // the completion being streamed: {before, text, start, firstAt, usage, ...}
    turns: [], // {user, reply, status: streaming|done|stopped|error, usage, ttft, ...}
    controller: null,
    settings: { ...DEFAULTS },
  };

  // ---------- rendering: text → DOM, with fenced code blocks and inline code ----------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Split Markdown-ish text into prose and fenced code blocks. An unclosed fence (mid-stream) runs to
  // the end, so a code block looks like one while it is still being written.
  function parseBlocks(text) {
    const blocks = [];
    const lines = text.split("\n");
    let prose = [];
    let code = null;
    const flushProse = () => {
      if (prose.length) blocks.push({ type: "text", text: prose.join("\n") });
      prose = [];
    };
    for (const line of lines) {
      if (code) {
        const close = line.match(/^\s*(`{3,}|~{3,})\s*$/);
        if (close && close[1][0] === code.fence[0] && close[1].length >= code.fence.length) {
          blocks.push({ type: "code", lang: code.lang, text: code.lines.join("\n"), open: false });
          code = null;
        } else {
          code.lines.push(line);
        }
        continue;
      }
      const open = line.match(/^\s{0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/);
      if (open) {
        flushProse();
        code = { fence: open[1], lang: open[2], lines: [] };
      } else {
        prose.push(line);
      }
    }
    if (code) blocks.push({ type: "code", lang: code.lang, text: code.lines.join("\n"), open: true });
    flushProse();
    return blocks;
  }

  function appendInline(parent, text) {
    // `inline code` becomes <code>; everything else stays a text node.
    const pattern = /`([^`\n]+)`/g;
    let last = 0;
    for (let m = pattern.exec(text); m; m = pattern.exec(text)) {
      if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
      parent.append(el("code", "inline", m[1]));
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
  }

  function codeBlock(block) {
    const wrap = el("div", "code-block");
    const head = el("div", "code-head");
    head.append(el("span", "code-lang", block.lang || "code"));
    if (navigator.clipboard && window.isSecureContext) {
      const copy = el("button", "copy", "Copy");
      copy.type = "button";
      copy.addEventListener("click", () => {
        navigator.clipboard.writeText(block.text).then(
          () => { copy.textContent = "Copied"; setTimeout(() => { copy.textContent = "Copy"; }, 1200); },
          () => { copy.textContent = "Copy failed"; },
        );
      });
      head.append(copy);
    }
    const pre = el("pre");
    pre.append(el("code", "", block.text));
    wrap.append(head, pre);
    return wrap;
  }

  // Replace `target`'s children with `text` rendered safely. Public (window.chatUI) for the browser test.
  function renderMarkdown(target, text) {
    const nodes = [];
    for (const block of parseBlocks(text)) {
      if (block.type === "code") {
        nodes.push(codeBlock(block));
      } else {
        const trimmed = block.text.replace(/^\n+|\n+$/g, "");
        if (!trimmed) continue;
        const para = el("div", "prose");
        appendInline(para, trimmed);
        nodes.push(para);
      }
    }
    target.replaceChildren(...nodes);
  }

  // ---------- settings (localStorage) and the API key (sessionStorage) ----------

  function loadSettings() {
    try {
      const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
      state.settings = { ...DEFAULTS, ...(saved && typeof saved === "object" ? saved : {}) };
    } catch {
      state.settings = { ...DEFAULTS };
    }
    ui.system.value = state.settings.system;
    ui.temperature.value = state.settings.temperature;
    ui.topP.value = state.settings.top_p;
    ui.maxTokens.value = state.settings.max_tokens ?? "";
    ui.jsonMode.checked = Boolean(state.settings.json);
    ui.extra.value = state.settings.extra;
    showSliderValues();
  }

  function saveSettings() {
    const max = ui.maxTokens.value.trim();
    state.settings = {
      system: ui.system.value,
      temperature: Number(ui.temperature.value),
      top_p: Number(ui.topP.value),
      max_tokens: max === "" ? null : Number(max),
      json: ui.jsonMode.checked,
      extra: ui.extra.value,
    };
    showSliderValues();
    try {
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
    } catch {
      // Storage full or disabled: the settings still apply to this page.
    }
  }

  function showSliderValues() {
    ui.temperatureValue.textContent = Number(ui.temperature.value).toFixed(2);
    ui.topPValue.textContent = Number(ui.topP.value).toFixed(2);
  }

  // The extra JSON object merged into each request; throws with a message the user can act on.
  function extraFields() {
    const text = ui.extra.value.trim();
    ui.extraError.hidden = true;
    if (!text) return {};
    let value;
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw new Error(`Extra request fields are not valid JSON: ${e.message}`);
    }
    if (!value || typeof value !== "object" || Array.isArray(value)) {
      throw new Error("Extra request fields must be a JSON object, like {\"seed\": 1}");
    }
    return value;
  }

  function apiKey() {
    try {
      return sessionStorage.getItem(API_KEY_KEY) || "";
    } catch {
      return "";
    }
  }

  function setApiKey(key) {
    try {
      if (key) sessionStorage.setItem(API_KEY_KEY, key);
      else sessionStorage.removeItem(API_KEY_KEY);
    } catch {
      // sessionStorage disabled: the key cannot be kept; the next request asks again.
    }
    ui.forgetKey.hidden = !key;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = apiKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  function showKeyForm(message) {
    ui.keyForm.hidden = false;
    ui.keyError.hidden = !message;
    ui.keyError.textContent = message || "";
    ui.keyInput.focus();
  }

  // ---------- talking to the server ----------

  class HTTPError extends Error {
    constructor(status, message, retryAfter) {
      super(message);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  async function httpError(response) {
    let message = response.statusText || "request failed";
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch {
      // Not our JSON error shape (a proxy's HTML page): keep the status text.
    }
    return new HTTPError(response.status, message, response.headers.get("retry-after"));
  }

  // Fetch the served model's name. Returns "" on success, else what went wrong; `notify` also shows it
  // as a notice in the conversation (at page load, where no message is waiting for the answer).
  async function loadModel(notify) {
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers() });
    } catch (e) {
      ui.modelName.textContent = "offline";
      return failed(`Network error: could not reach the server to list its models (${e.message}).`);
    }
    if (!response.ok) {
      const err = await httpError(response);
      if (err.status === 401) {
        ui.modelName.textContent = "locked";
        showKeyForm(apiKey() ? `The key was refused: ${err.message}` : "");
        // The key form is the notice; a message being sent shows the error in its turn.
        return `Error 401: ${err.message}. Enter the API key above, then retry.`;
      }
      return failed(`Could not list the server's models: error ${err.status}: ${err.message}`);
    }
    const body = await response.json();
    const card = body.data && body.data[0];
    if (!card) return failed("The server lists no model.");
    state.model = card.id;
    ui.modelName.textContent = card.id;
    ui.modelName.title = card.max_model_len ? `context: ${card.max_model_len} tokens` : card.id;
    ui.keyForm.hidden = true;
    applyServerMode();
    return "";

    function failed(message) {
      if (notify) addNotice(message);
      return message;
    }
  }

  // Messages for the request: system prompt, finished (or stopped) turns, then the new message.
  // Failed turns are left out, so an error never becomes part of the model's context.
  function history(text) {
    const messages = [];
    const system = state.settings.system.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const turn of state.turns) {
      const calls = toolCalls(turn);
      if ((turn.status === "done" || turn.status === "stopped") && (turn.reply || calls.length)) {
        const reply = { role: "assistant", content: turn.reply || null };
        if (calls.length) reply.tool_calls = calls;
        messages.push({ role: "user", content: turn.user }, reply);
      }
    }
    messages.push({ role: "user", content: text });
    return messages;
  }

  // Reads an SSE body: events are separated by blank lines; each `data:` line adds to the event's data.
  async function readEvents(reader, onData) {
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length && onData(data.join("\n")) === false) return true;
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line[5] === " " ? 6 : 5));
        } // comments (": ping") and other fields are ignored
      }
    }
    return false; // ended without [DONE]
  }

  async function send(text) {
    if (state.controller || !text.trim()) return;
    const extra = checkedExtra();
    if (!extra) return;
    ui.input.value = "";
    autoGrow();
    const turn = addTurn(text);
    const controller = new AbortController();
    state.controller = turn.controller = controller;
    setBusy(true);
    if (!state.model) {
      const problem = await loadModel(false);
      if (problem) {
        finishTurn(turn, "error", problem);
        return;
      }
    }
    // Extra fields may override the sampling settings, not what the page itself depends on.
    const body = {
      temperature: state.settings.temperature,
      top_p: state.settings.top_p,
      ...(state.settings.max_tokens ? { max_tokens: state.settings.max_tokens } : {}),
      ...(state.settings.json ? { response_format: { type: "json_object" } } : {}),
      ...extra,
      model: state.model,
      messages: history(text),
      stream: true,
      stream_options: { include_usage: true },
    };
    turn.start = performance.now();
    let response = null;
    try {
      response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw await httpError(response);
      const reader = response.body.getReader();
      const finished = await readEvents(reader, (data) => onEvent(turn, data));
      if (!finished) throw new Error("the connection closed before the reply finished");
      finishTurn(turn, "done");
    } catch (e) {
      if (e.name === "AbortError") finishTurn(turn, "stopped");
      else finishTurn(turn, "error", failureMessage(e, response, "reply"));
      controller.abort(); // whatever went wrong, release the connection
    }
  }

  // The extra request fields, or null once the settings panel shows what is wrong with them.
  function checkedExtra() {
    try {
      return extraFields();
    } catch (e) {
      ui.extraError.textContent = e.message;
      ui.extraError.hidden = false;
      openSettings(true);
      ui.extra.focus();
      return null;
    }
  }

  // What went wrong with a streamed request, for the user; a 401 also opens the key form. `response` is
  // the fetch's response, if one came; `what` names the streamed text ("reply", "completion").
  function failureMessage(e, response, what) {
    if (e instanceof HTTPError) {
      if (e.status === 401) showKeyForm(apiKey() ? `The key was refused: ${e.message}` : "");
      const retry = e.retryAfter ? ` Retry in ${e.retryAfter} s.` : "";
      const hint = e.status === 401 ? " Enter the API key above, then retry." : "";
      return `Error ${e.status}: ${e.message.replace(/\.$/, "")}.${retry}${hint}`;
    }
    if (e.streamError) return `The server ended the ${what} with an error: ${e.message}`;
    if (response) return `Connection lost mid-${what}: ${e.message}`;
    return `Network error: could not reach the server (${e.message}).`;
  }

  // One SSE data payload as JSON; throws on [DONE]-less garbage and on an error event.
  function parseChunk(data) {
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      throw Object.assign(new Error("a malformed event arrived"), { streamError: true });
    }
    if (chunk.error) {
      throw Object.assign(new Error(chunk.error.message || "unknown error"), { streamError: true });
    }
    return chunk;
  }

  // One SSE data payload. Returns false at [DONE]; throws on an error event.
  function onEvent(turn, data) {
    if (data === "[DONE]") return false;
    const chunk = parseChunk(data);
    if (chunk.usage) turn.usage = chunk.usage;
    if (chunk.timings) turn.timings = chunk.timings;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return true;
    const content = choice.delta && choice.delta.content;
    if (content) {
      const now = performance.now();
      if (turn.firstAt === undefined) turn.firstAt = now;
      turn.lastAt = now;
      turn.chunks += 1;
      turn.reply += content;
      scheduleRender(turn);
    }
    // Tool calls arrive as delta.tool_calls pieces (OpenAI's shape): id and name first, arguments after.
    for (const piece of (choice.delta && choice.delta.tool_calls) || []) {
      const call = (turn.calls[piece.index] ??= { id: "", name: "", arguments: "" });
      if (piece.id) call.id = piece.id;
      if (piece.function && piece.function.name) call.name += piece.function.name;
      if (piece.function && piece.function.arguments) call.arguments += piece.function.arguments;
      if (turn.firstAt === undefined) turn.firstAt = performance.now();
      scheduleRender(turn);
    }
    if (choice.finish_reason) turn.finishReason = choice.finish_reason;
    return true;
  }

  // A turn's tool calls in OpenAI's message shape (for the history).
  function toolCalls(turn) {
    return turn.calls.filter(Boolean).map((c) => ({
      id: c.id, type: "function", function: { name: c.name, arguments: c.arguments },
    }));
  }

  // One readable block per tool call: the function's name, then its arguments pretty-printed (as text).
  function toolCallBlock(call) {
    const block = el("div", "tool-call");
    block.append(el("div", "tool-call-head", `Tool call: ${call.name || "(unnamed)"}`));
    let args = call.arguments;
    try {
      args = JSON.stringify(JSON.parse(call.arguments), null, 2);
    } catch {
      // Not (yet) valid JSON: shown as it came.
    }
    block.append(el("pre", "tool-call-args", args));
    return block;
  }

  function stop() {
    if (state.controller) state.controller.abort(); // closing the connection aborts the engine request
  }

  // ---------- the conversation's DOM ----------

  function nearBottom() {
    const m = ui.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < NEAR_BOTTOM_PX;
  }

  function keepBottom(wasNear) {
    if (wasNear) ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function addNotice(message) {
    const wasNear = nearBottom();
    ui.empty.hidden = true;
    const notice = el("div", "notice error", message);
    notice.setAttribute("role", "alert");
    ui.messages.append(notice);
    keepBottom(wasNear);
  }

  function addTurn(text) {
    ui.empty.hidden = true;
    const turn = { user: text, reply: "", calls: [], status: "streaming", chunks: 0, usage: null, nodes: {} };
    const user = el("div", "msg user");
    user.append(el("div", "who", "You"), el("div", "bubble", text));
    const bot = el("div", "msg assistant streaming");
    const body = el("div", "bubble reply");
    const meta = el("div", "meta");
    bot.append(el("div", "who", state.model || "model"), body, meta);
    body.append(el("span", "typing", "…"));
    meta.append(el("span", "stat", "generating…"));
    turn.nodes = { user, bot, body, meta };
    state.turns.push(turn);
    ui.messages.append(user, bot);
    ui.messages.scrollTop = ui.messages.scrollHeight;
    return turn;
  }

  function scheduleRender(turn) {
    if (turn.renderPending) return;
    turn.renderPending = true;
    // One render per frame however many tokens arrived; a hidden tab renders when the reply ends.
    requestAnimationFrame(() => {
      turn.renderPending = false;
      if (turn.status === "streaming") renderReply(turn);
    });
  }

  function renderReply(turn) {
    const wasNear = nearBottom();
    renderMarkdown(turn.nodes.body, turn.reply);
    turn.nodes.body.append(...turn.calls.filter(Boolean).map(toolCallBlock));
    keepBottom(wasNear);
  }

  function finishTurn(turn, status, error) {
    turn.status = status;
    turn.endAt = performance.now();
    if (state.controller === turn.controller) {
      state.controller = null;
      setBusy(false);
    }
    const { bot, body, meta } = turn.nodes;
    bot.classList.remove("streaming");
    bot.classList.add(status);
    if (turn.reply || turn.calls.length) renderReply(turn);
    else if (error) body.hidden = true; // the error box below says what happened
    else body.replaceChildren(el("span", "empty-reply", "(empty reply)"));
    meta.replaceChildren(...statsLine(turn));
    if (error) {
      const box = el("div", "error-box");
      box.setAttribute("role", "alert");
      box.append(el("span", "error-text", error));
      const retry = el("button", "retry ghost", "Retry");
      retry.type = "button";
      retry.addEventListener("click", () => retryTurn(turn));
      box.append(retry);
      bot.append(box);
    }
    keepBottom(true);
  }

  // Under each reply: time to first token as this page saw it (queue and network included), and the
  // decode rate. The rate comes from the server's own per-token time when the stream reports it (a short
  // reply can arrive in one network read, which would make a client-side rate meaningless); a stopped
  // reply has no final report, so its rate is measured here, over tokens after the first.
  function statsLine(turn) {
    const parts = [];
    if (turn.firstAt !== undefined) {
      parts.push(`TTFT ${Math.round(turn.firstAt - turn.start)} ms`);
      const tokens = turn.usage ? turn.usage.completion_tokens : turn.chunks;
      const perToken = turn.timings && turn.timings.time_per_token_ms;
      const seconds = ((turn.lastAt ?? turn.firstAt) - turn.firstAt) / 1000;
      let rate = "–";
      if (perToken > 0) rate = (1000 / perToken).toFixed(1);
      else if (tokens > 1 && seconds >= 0.05) rate = ((tokens - 1) / seconds).toFixed(1);
      parts.push(`${rate} tok/s`);
      parts.push(`${turn.usage ? "" : "~"}${tokens} token${tokens === 1 ? "" : "s"}`);
    }
    if (turn.status === "stopped") parts.push("stopped");
    else if (turn.finishReason === "length") parts.push("max tokens reached");
    else if (turn.finishReason === "tool_calls") parts.push("tool calls");
    return parts.map((p) => el("span", "stat", p));
  }

  function retryTurn(turn) {
    if (state.controller) return;
    const i = state.turns.indexOf(turn);
    if (i >= 0) state.turns.splice(i, 1);
    turn.nodes.user.remove();
    turn.nodes.bot.remove();
    send(turn.user);
  }

  function newChat() {
    stop();
    state.turns = [];
    ui.messages.replaceChildren(ui.empty);
    ui.empty.hidden = false;
    ui.input.focus();
  }

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    document.body.classList.toggle("busy", busy);
  }

  function autoGrow() {
    ui.input.style.height = "auto";
    ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
  }

  function openSettings(open) {
    ui.settings.hidden = !open;
    ui.settingsToggle.setAttribute("aria-expanded", String(open));
    document.body.classList.toggle("settings-open", open);
  }

  // ---------- completion mode: the model continues the text in the box, through /v1/completions ----------

  // Switch between "chat" and "completion"; a stream in progress is stopped first.
  function setMode(mode) {
    if (mode !== "chat" && mode !== "completion") return;
    if (mode !== state.mode) stop();
    state.mode = mode;
    const completion = mode === "completion";
    ui.modeChat.setAttribute("aria-pressed", String(!completion));
    ui.modeCompletion.setAttribute("aria-pressed", String(completion));
    for (const node of [ui.messages, ui.composer, ui.composerHint, ui.newChat]) node.hidden = completion;
    ui.completion.hidden = !completion;
    document.body.dataset.mode = mode;
    (completion ? ui.completionText : ui.input).focus();
  }

  // The mode the server opens the page in (--ui-mode; for `auto`, completion for a base model), unless
  // the user has switched already. Without an answer the page stays in chat mode.
  async function applyServerMode() {
    let config;
    try {
      const response = await fetch("/ui/config", { headers: headers() });
      if (!response.ok) return;
      config = await response.json();
    } catch {
      return;
    }
    ui.modeSwitch.title = `Opened in ${config.mode} mode: ${config.mode_reason}`;
    if (!state.modeChosen) setMode(config.mode);
  }

  async function complete() {
    const prompt = ui.completionText.value;
    if (state.controller || !prompt) return;
    const extra = checkedExtra();
    if (!extra) return;
    const run = { before: prompt, text: prompt, chunks: 0, usage: null, status: "streaming" };
    const controller = new AbortController();
    state.completion = run;
    state.controller = run.controller = controller;
    setCompleting(true);
    if (!state.model) {
      const problem = await loadModel(false);
      if (problem) {
        finishCompletion(run, "error", problem);
        return;
      }
    }
    const body = {
      temperature: state.settings.temperature,
      top_p: state.settings.top_p,
      ...(state.settings.max_tokens ? { max_tokens: state.settings.max_tokens } : {}),
      ...extra,
      model: state.model,
      prompt,
      stream: true,
      stream_options: { include_usage: true },
    };
    run.start = performance.now();
    let response = null;
    try {
      response = await fetch("/v1/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw await httpError(response);
      const finished = await readEvents(response.body.getReader(), (data) => onCompletionEvent(run, data));
      if (!finished) throw new Error("the connection closed before the completion finished");
      finishCompletion(run, "done");
    } catch (e) {
      if (e.name === "AbortError") finishCompletion(run, "stopped");
      else finishCompletion(run, "error", failureMessage(e, response, "completion"));
      controller.abort();
    }
  }

  function onCompletionEvent(run, data) {
    if (data === "[DONE]") return false;
    const chunk = parseChunk(data);
    if (chunk.usage) run.usage = chunk.usage;
    if (chunk.timings) run.timings = chunk.timings;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return true;
    if (choice.text) {
      const now = performance.now();
      if (run.firstAt === undefined) run.firstAt = now;
      run.lastAt = now;
      run.chunks += 1;
      run.text += choice.text;
      if (!run.renderPending) {
        run.renderPending = true; // one write per frame however many tokens arrived
        requestAnimationFrame(() => {
          run.renderPending = false;
          if (run.status === "streaming") showCompletionText(run.text);
        });
      }
    }
    if (choice.finish_reason) run.finishReason = choice.finish_reason;
    return true;
  }

  // The box's text, kept scrolled to the end while the end is in view (as the chat keeps its bottom).
  function showCompletionText(text) {
    const box = ui.completionText;
    const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < NEAR_BOTTOM_PX;
    box.value = text;
    if (atEnd) box.scrollTop = box.scrollHeight;
  }

  function finishCompletion(run, status, error) {
    run.status = status;
    if (state.controller === run.controller) state.controller = null;
    setCompleting(false);
    showCompletionText(run.text);
    ui.completionUndo.hidden = run.text === run.before;
    ui.completionStats.replaceChildren(...statsLine(run));
    if (error) {
      const retry = el("button", "retry ghost", "Retry");
      retry.type = "button";
      retry.addEventListener("click", () => {
        ui.completionText.value = run.before;
        complete();
      });
      ui.completionError.replaceChildren(el("span", "error-text", error), retry);
    }
    ui.completionError.hidden = !error;
  }

  function setCompleting(busy) {
    ui.complete.hidden = busy;
    ui.completeStop.hidden = !busy;
    ui.completionText.readOnly = busy; // the stream writes into it
    ui.completion.classList.toggle("streaming", busy);
    document.body.classList.toggle("busy", busy);
    if (busy) {
      ui.completionUndo.hidden = true;
      ui.completionError.hidden = true;
      ui.completionStats.replaceChildren(el("span", "stat", "generating…"));
    }
  }

  function undoCompletion() {
    if (state.controller || !state.completion) return;
    ui.completionText.value = state.completion.before;
    ui.completionUndo.hidden = true;
    ui.completionStats.replaceChildren();
    ui.completionText.focus();
  }

  function initCompletion() {
    Object.assign(ui, {
      modeSwitch: document.querySelector(".mode-switch"),
      modeChat: $("mode-chat"),
      modeCompletion: $("mode-completion"),
      composerHint: $("composer-hint"),
      completion: $("completion"),
      completionForm: $("completion-form"),
      completionText: $("completion-text"),
      complete: $("complete"),
      completeStop: $("complete-stop"),
      completionUndo: $("completion-undo"),
      completionStats: $("completion-stats"),
      completionError: $("completion-error"),
    });
    for (const [button, mode] of [[ui.modeChat, "chat"], [ui.modeCompletion, "completion"]]) {
      button.addEventListener("click", () => {
        state.modeChosen = true;
        setMode(mode);
      });
    }
    ui.completionForm.addEventListener("submit", (e) => {
      e.preventDefault();
      complete();
    });
    ui.completionText.addEventListener("keydown", (e) => {
      // Enter is a new line (this is code); Ctrl+Enter (Cmd+Enter) completes.
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !e.isComposing) {
        e.preventDefault();
        complete();
      } else if (e.key === "Escape" && state.controller) {
        stop();
      }
    });
    ui.completionText.addEventListener("input", () => { ui.completionUndo.hidden = true; });
    ui.completeStop.addEventListener("click", stop);
    ui.completionUndo.addEventListener("click", undoCompletion);
    document.body.dataset.mode = state.mode;
  }

  // ---------- wiring ----------

  function init() {
    Object.assign(ui, {
      modelName: $("model-name"),
      messages: $("messages"),
      empty: $("empty"),
      input: $("input"),
      send: $("send"),
      stop: $("stop"),
      composer: $("composer"),
      newChat: $("new-chat"),
      settings: $("settings"),
      settingsToggle: $("settings-toggle"),
      settingsClose: $("settings-close"),
      settingsReset: $("settings-reset"),
      system: $("system-prompt"),
      temperature: $("temperature"),
      temperatureValue: $("temperature-value"),
      topP: $("top-p"),
      topPValue: $("top-p-value"),
      maxTokens: $("max-tokens"),
      jsonMode: $("json-mode"),
      extra: $("extra"),
      extraError: $("extra-error"),
      keyForm: $("key-form"),
      keyInput: $("api-key"),
      keyError: $("key-error"),
      forgetKey: $("forget-key"),
    });
    loadSettings();
    initCompletion();
    ui.forgetKey.hidden = !apiKey();

    ui.composer.addEventListener("submit", (e) => {
      e.preventDefault();
      send(ui.input.value);
    });
    ui.input.addEventListener("keydown", (e) => {
      // Enter sends, Shift+Enter is a new line; never while an IME is composing a character.
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send(ui.input.value);
      } else if (e.key === "Escape" && state.controller) {
        stop();
      }
    });
    ui.input.addEventListener("input", autoGrow);
    ui.stop.addEventListener("click", stop);
    ui.newChat.addEventListener("click", newChat);
    ui.settingsToggle.addEventListener("click", () => openSettings(ui.settings.hidden));
    ui.settingsClose.addEventListener("click", () => openSettings(false));
    for (const input of [ui.system, ui.temperature, ui.topP, ui.maxTokens, ui.extra]) {
      input.addEventListener("input", saveSettings);
    }
    ui.jsonMode.addEventListener("change", saveSettings);
    ui.settingsReset.addEventListener("click", () => {
      try {
        localStorage.removeItem(SETTINGS_KEY);
      } catch {
        // Storage disabled: nothing was saved to remove.
      }
      loadSettings();
    });
    ui.forgetKey.addEventListener("click", () => {
      setApiKey("");
      state.model = null;
      loadModel(true);
    });
    ui.keyForm.addEventListener("submit", async (e) => {
      e.preventDefault();
      const key = ui.keyInput.value.trim();
      if (!key) return;
      setApiKey(key);
      ui.keyInput.value = "";
      ui.keyError.hidden = true;
      if (!(await loadModel(true))) ui.input.focus();
    });

    loadModel(true);
    ui.input.focus();
  }

  window.chatUI = { renderMarkdown, parseBlocks, setMode, state };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
