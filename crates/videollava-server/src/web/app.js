// The web page of `videollava serve`. It uses only the public API, so it doubles as a worked
// example of it:
//   GET  /v1/models, GET /health            the model's name and the server's limits;
//   POST /v1/frames                          the frames the model will see of a video (preview);
//   POST /v1/chat/completions (stream: true) the conversation: the whole history is sent each
//                                            turn, the media as a `video_url`/`image_url` part
//                                            (a data: URI or the pasted URL) in the first user
//                                            message, as OpenAI clients do.
// Stop aborts the fetch; the server cancels a generation whose client goes away.
"use strict";

const $ = (id) => document.getElementById(id);
const VIDEO_EXT = ["mp4", "m4v", "webm", "mkv", "mov", "avi", "gif", "mpg", "mpeg", "ts", "ogv", "flv", "3gp", "wmv"];
const IMAGE_EXT = ["png", "jpg", "jpeg", "webp", "bmp"];

const state = {
  model: null,
  maxFileBytes: 48 * 1024 * 1024, // replaced by the server's limits from /health
  maxFrames: 32,
  media: null,      // {kind: "video"|"image", url, name, objectUrl}
  history: [],      // OpenAI messages sent so far (user + assistant)
  controller: null, // AbortController of the running answer
  framesToken: 0,   // the latest frame preview; older answers are dropped
  chatId: 0,        // the conversation; New chat starts another
};

function fmtBytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(n >= 10 << 20 ? 0 : 1) + " MB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(0) + " KB";
  return n + " bytes";
}

function extension(name) {
  const m = /\.([a-z0-9]+)(?:[?#].*)?$/i.exec(name || "");
  return m ? m[1].toLowerCase() : "";
}

/** "video", "image" or null for a File (by its MIME type, else its extension). */
function kindOfFile(file) {
  const t = (file.type || "").toLowerCase();
  if (t === "image/gif") return "video"; // the server decodes GIFs as videos
  if (t.startsWith("video/")) return "video";
  if (t.startsWith("image/")) return t === "image/svg+xml" ? null : "image";
  const ext = extension(file.name);
  if (VIDEO_EXT.includes(ext)) return "video";
  if (IMAGE_EXT.includes(ext)) return "image";
  return null;
}

/** The message and parameter of an error response of the API (OpenAI's
 *  `{"error": {"message", "param"}}`). */
async function errorInfo(resp) {
  let text = "";
  try { text = await resp.text(); } catch (_) { /* keep the status alone */ }
  try {
    const v = JSON.parse(text);
    if (v && v.error && v.error.message) {
      return { message: `${v.error.message} (HTTP ${resp.status})`, param: v.error.param || null };
    }
  } catch (_) { /* not JSON */ }
  return { message: `HTTP ${resp.status}${text ? ": " + text.slice(0, 300) : ""}`, param: null };
}

async function errorMessage(resp) {
  return (await errorInfo(resp)).message;
}

// ---------------------------------------------------------------------------------------------
// Server facts

async function loadServerInfo() {
  try {
    const [models, health] = await Promise.all([fetch("/v1/models"), fetch("/health")]);
    if (models.ok) {
      const v = await models.json();
      state.model = v.data && v.data[0] ? v.data[0].id : null;
      $("model").textContent = state.model || "";
    }
    if (health.ok) {
      const h = await health.json();
      if (h.limits) {
        // A data: URI is 4/3 of the file, inside a JSON body with the rest of the request.
        const bodyRoom = Math.floor((h.limits.max_body_bytes - 256 * 1024) * 3 / 4);
        state.maxFileBytes = Math.max(0, Math.min(h.limits.max_media_bytes, bodyRoom));
        state.maxFrames = h.limits.max_num_frames || state.maxFrames;
        $("num-frames").max = String(state.maxFrames);
      }
      setStatus(`ready · ${h.running} running`, false);
    } else {
      setStatus(`server answered HTTP ${health.status}`, true);
    }
  } catch (e) {
    setStatus("server unreachable", true);
  }
  $("max-size").textContent = fmtBytes(state.maxFileBytes);
}

async function refreshStatus() {
  try {
    const h = await fetch("/health");
    if (h.ok) {
      const v = await h.json();
      setStatus(`ready · ${v.running} running`, false);
    } else {
      setStatus(`server answered HTTP ${h.status}`, true);
    }
  } catch (_) {
    setStatus("server unreachable", true);
  }
}

function setStatus(text, bad) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", !!bad);
}

// ---------------------------------------------------------------------------------------------
// Media

function showMediaError(message) {
  const el = $("media-error");
  el.textContent = message;
  el.hidden = !message;
}

function clearMedia() {
  if (state.media && state.media.objectUrl) URL.revokeObjectURL(state.media.objectUrl);
  state.media = null;
  state.framesToken++;
  $("attached").hidden = true;
  $("player-box").hidden = true;
  $("player-box").open = false;
  $("player").removeAttribute("src");
  $("image").hidden = true;
  $("image").removeAttribute("src");
  $("frames").replaceChildren();
  $("frames-caption").textContent = "";
  document.querySelector(".media").classList.remove("has-media");
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error || new Error("cannot read the file"));
    r.readAsDataURL(file);
  });
}

async function attachFile(file) {
  showMediaError("");
  const kind = kindOfFile(file);
  if (!kind) {
    showMediaError(`“${file.name}” is not a video or an image the model can read` +
      `${file.type ? ` (${file.type})` : ""}. Attach a video (MP4, WebM, MKV, MOV, AVI, GIF) or an image (PNG, JPEG, WebP, BMP).`);
    return;
  }
  if (file.size > state.maxFileBytes) {
    showMediaError(`“${file.name}” is ${fmtBytes(file.size)}; this server accepts files up to ${fmtBytes(state.maxFileBytes)}.`);
    return;
  }
  if (file.size === 0) {
    showMediaError(`“${file.name}” is empty.`);
    return;
  }
  let url;
  try {
    url = await readAsDataURL(file);
  } catch (e) {
    showMediaError(`Cannot read “${file.name}”: ${e.message}`);
    return;
  }
  // Files without a MIME type read as "data:application/octet-stream" or "data:"; the server
  // only needs the base64 payload.
  setMedia({ kind, url, name: `${file.name} · ${fmtBytes(file.size)}`, objectUrl: URL.createObjectURL(file) });
}

function attachUrl(url, kind) {
  showMediaError("");
  url = url.trim();
  if (!/^https?:\/\/\S+$/i.test(url)) {
    showMediaError("Paste an http:// or https:// URL of a video or an image.");
    return;
  }
  setMedia({ kind, url, name: url, objectUrl: null });
}

function setMedia(media) {
  clearMedia();
  if (state.history.length) newChat("New media: the conversation starts over.");
  state.media = media;
  document.querySelector(".media").classList.add("has-media");
  $("attached").hidden = false;
  $("attached-name").textContent = media.name;
  const src = media.objectUrl || media.url;
  if (media.kind === "video") {
    $("player").src = src;
    $("player-box").hidden = false;
    loadFrames();
  } else {
    $("image").src = src;
    $("image").hidden = false;
    $("frames-caption").textContent = "The model sees this image.";
  }
  $("question").focus();
}

function numFrames() {
  const n = parseInt($("num-frames").value, 10);
  return Number.isFinite(n) && n >= 1 ? Math.min(n, state.maxFrames) : 8;
}

function fmtTime(t) {
  if (t == null) return "";
  const m = Math.floor(t / 60);
  const s = t - m * 60;
  return m ? `${m}:${s.toFixed(2).padStart(5, "0")}` : `${s.toFixed(2)} s`;
}

/** Asks the server which frames the model will see, and shows them. */
async function loadFrames() {
  const media = state.media;
  if (!media || media.kind !== "video") return;
  const token = ++state.framesToken;
  const n = numFrames();
  showMediaError("");
  $("frames").replaceChildren();
  $("frames-caption").textContent = `Reading the ${n} frames the model will see…`;
  let resp;
  try {
    // The server decodes a few previews at a time and answers 429 beyond: wait and retry.
    for (let attempt = 0; ; attempt++) {
      resp = await fetch("/v1/frames", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ video_url: { url: media.url }, num_frames: n }),
      });
      if (resp.status !== 429 || attempt >= 10 || token !== state.framesToken) break;
      await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
    }
  } catch (e) {
    if (token === state.framesToken) {
      $("frames-caption").textContent = "";
      showMediaError(`Cannot reach the server: ${e.message}`);
    }
    return;
  }
  if (token !== state.framesToken) return;
  if (!resp.ok) {
    const err = await errorInfo(resp);
    if (token !== state.framesToken) return;
    $("frames-caption").textContent = "";
    if (err.param === "num_frames" || resp.status === 429) {
      // The video is fine; the frame count or the moment is not.
      showMediaError(`No frame preview: ${err.message}`);
      return;
    }
    // The model could not read it either: it is not kept for the conversation.
    clearMedia();
    showMediaError(`The server cannot read this video: ${err.message}`);
    return;
  }
  const v = await resp.json();
  if (token !== state.framesToken) return;
  const items = v.frames.map((f, i) => {
    const li = document.createElement("li");
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = f.image;
    img.alt = `Frame ${i + 1}: frame ${f.index}${f.timestamp != null ? " at " + fmtTime(f.timestamp) : ""}`;
    img.title = `frame ${f.index} of ${v.total_frames}`;
    const cap = document.createElement("figcaption");
    cap.textContent = f.timestamp != null ? fmtTime(f.timestamp) : `#${f.index}`;
    fig.append(img, cap);
    li.append(fig);
    return li;
  });
  $("frames").replaceChildren(...items);
  const facts = [`${v.total_frames} frames`];
  if (v.duration != null) facts.push(fmtTime(v.duration));
  if (v.frame_rate != null) facts.push(`${+v.frame_rate.toFixed(2)} fps`);
  facts.push(`${v.width}×${v.height}`);
  $("frames-caption").textContent = `The model sees these ${v.frames.length} frames (of ${facts.join(", ")}):`;
}

// ---------------------------------------------------------------------------------------------
// Conversation

function logEl() { return $("log"); }

function scrollDown() {
  const log = logEl();
  log.scrollTop = log.scrollHeight;
}

function addMessage(role, text, extra) {
  $("empty").hidden = true;
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (extra) {
    const tag = document.createElement("span");
    tag.className = "media-tag";
    tag.textContent = extra;
    div.append(tag);
  }
  const t = document.createElement("div");
  t.className = "text";
  t.textContent = text;
  div.append(t);
  logEl().append(div);
  scrollDown();
  return div;
}

function addError(message) {
  $("empty").hidden = true;
  const div = document.createElement("div");
  div.className = "msg error";
  div.setAttribute("role", "alert");
  div.textContent = message;
  logEl().append(div);
  scrollDown();
  return div;
}

function newChat(note) {
  state.chatId++;
  if (state.controller) state.controller.abort();
  state.history = [];
  logEl().querySelectorAll(".msg").forEach((m) => m.remove());
  $("empty").hidden = false;
  if (note) {
    const p = document.createElement("p");
    p.className = "msg hint";
    p.textContent = note;
    logEl().append(p);
  }
}

/** The generation settings as request fields (empty fields are left to the server). */
function settings() {
  const out = {};
  const num = (id, parse) => {
    const raw = $(id).value.trim();
    if (raw === "") return undefined;
    const v = parse(raw);
    if (!Number.isFinite(v)) throw new Error(`${$(id).labels[0].textContent}: “${raw}” is not a number`);
    return v;
  };
  const maxTokens = num("max-tokens", (s) => parseInt(s, 10));
  if (maxTokens !== undefined) out.max_tokens = maxTokens;
  const temperature = num("temperature", parseFloat);
  if (temperature !== undefined) out.temperature = temperature;
  const topP = num("top-p", parseFloat);
  if (topP !== undefined) out.top_p = topP;
  const seed = num("seed", (s) => parseInt(s, 10));
  if (seed !== undefined) out.seed = seed;
  if (state.media && state.media.kind === "video") out.num_frames = numFrames();
  return out;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("new-chat").disabled = false;
}

async function ask(question) {
  if (state.controller) return;
  let extra;
  try {
    extra = settings();
  } catch (e) {
    addError(e.message);
    return;
  }
  // The media goes into the first user message; later turns are text.
  let content = question;
  let tag = null;
  if (state.history.length === 0 && state.media) {
    const part = state.media.kind === "video"
      ? { type: "video_url", video_url: { url: state.media.url } }
      : { type: "image_url", image_url: { url: state.media.url } };
    content = [part, { type: "text", text: question }];
    tag = `with the ${state.media.kind}`;
  }
  const user = { role: "user", content };
  const messages = [...state.history, user];
  const body = { messages, stream: true, stream_options: { include_usage: true }, ...extra };
  if (state.model) body.model = state.model;

  addMessage("user", question, tag);
  const answer = addMessage("assistant", "");
  const textEl = answer.querySelector(".text");
  const stats = document.createElement("div");
  stats.className = "stats";
  answer.append(stats);
  answer.dataset.state = "streaming";

  const chatId = state.chatId;
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null;
  let tLast = null;
  let text = "";
  let usage = null;
  let timings = null; // the server's (llama.cpp-style `timings` extension of the usage chunk)
  let finish = null;
  let failure = null;
  // The text is drawn at most every 50 ms: a fast model sends hundreds of tokens a second, and
  // redrawing for each would keep the page (and its Stop button) busy.
  let renderTimer = null;
  const render = () => {
    renderTimer = null;
    textEl.textContent = text;
    scrollDown();
  };
  const scheduleRender = () => {
    if (renderTimer === null) renderTimer = setTimeout(render, 50);
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) {
      failure = await errorMessage(resp);
    } else {
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      let done = false;
      while (!done) {
        const r = await reader.read();
        if (r.done) break;
        buf += decoder.decode(r.value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") { done = true; break; }
            const chunk = JSON.parse(data);
            if (chunk.error) { failure = chunk.error.message || "the generation failed"; continue; }
            if (chunk.usage) usage = chunk.usage;
            if (chunk.timings) timings = chunk.timings;
            const choice = chunk.choices && chunk.choices[0];
            if (!choice) continue;
            const delta = choice.delta && choice.delta.content;
            if (delta) {
              if (tFirst === null) tFirst = performance.now();
              tLast = performance.now();
              text += delta;
              scheduleRender();
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
      if (!done && !failure) failure = "the answer ended before the server said it was done";
    }
  } catch (e) {
    if (e.name === "SyntaxError") failure = `The server sent an unreadable answer: ${e.message}`;
    else if (e.name !== "AbortError") failure = `Cannot reach the server: ${e.message}`;
  }
  clearTimeout(renderTimer);
  state.controller = null;
  setBusy(false);
  refreshStatus();
  // New chat during the answer: that conversation (and this answer's bubble) is gone.
  if (chatId !== state.chatId) return;
  render();
  const stopped = controller.signal.aborted;

  const parts = [];
  if (tFirst !== null) parts.push(`first token ${((tFirst - t0) / 1000).toFixed(2)} s`);
  const tokens = usage ? usage.completion_tokens : null;
  // Tokens per second: the server's decoding rate; else what arrived here (tokens can arrive
  // bunched, so that is only a fallback).
  let rate = timings && timings.predicted_per_second != null ? timings.predicted_per_second : null;
  if (rate === null && tokens != null && tokens > 1 && tLast > tFirst) rate = (tokens - 1) / ((tLast - tFirst) / 1000);
  if (rate !== null) parts.push(`${rate.toFixed(1)} tokens/s`);
  if (tokens != null) parts.push(`${tokens} tokens`);
  if (stopped) parts.push("stopped");
  else if (finish === "length") parts.push("cut at max tokens");
  stats.textContent = parts.join(" · ");

  if (failure && !text) {
    answer.remove();
    addError(failure);
    // The question stays out of the history; it is put back to retry.
    if (!$("question").value) $("question").value = question;
    return;
  }
  answer.dataset.state = stopped ? "stopped" : failure ? "error" : "done";
  if (failure) addError(failure);
  // A stopped answer stays in the history as far as it went, as in other OpenAI clients.
  state.history = [...messages, { role: "assistant", content: text }];
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ---------------------------------------------------------------------------------------------
// Wiring

function init() {
  const drop = $("drop");
  const file = $("file");
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); }
  });
  file.addEventListener("change", () => {
    if (file.files && file.files[0]) attachFile(file.files[0]);
    file.value = "";
  });
  // A file dropped anywhere on the page is attached (and never opened by the browser).
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; drop.classList.add("over"); });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; drop.classList.remove("over"); } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    drop.classList.remove("over");
    const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (f) attachFile(f);
  });

  $("url").addEventListener("input", () => {
    const ext = extension($("url").value);
    if (IMAGE_EXT.includes(ext)) $("url-kind").value = "image";
    else if (VIDEO_EXT.includes(ext)) $("url-kind").value = "video";
  });
  $("url-form").addEventListener("submit", (e) => {
    e.preventDefault();
    attachUrl($("url").value, $("url-kind").value);
  });
  $("remove").addEventListener("click", () => { clearMedia(); showMediaError(""); });

  let framesTimer = null;
  $("num-frames").addEventListener("change", () => {
    clearTimeout(framesTimer);
    framesTimer = setTimeout(loadFrames, 300);
  });

  const q = $("question");
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = q.value.trim();
    if (!text || state.controller) return;
    q.value = "";
    ask(text);
  });
  q.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("ask").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => { newChat(); q.focus(); });

  loadServerInfo();
}

init();
