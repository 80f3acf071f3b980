// The gateway's page: enqueue jobs, follow each one's Server-Sent Events, and keep a history
// of the key's jobs (GET /v1/jobs) with a player, a named download, cancel, "more like this"
// and "continue this"; a stream=True job's player plays its audio while it generates.
//
// EventSource and <audio src> cannot send an Authorization header. When a job view carries
// signed_urls (short-lived URLs with ?token=) the page uses them directly; otherwise it reads
// the events from a fetch() stream and fetches the audio into a blob URL, with the key.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "musicgen-pipeline.api-key";
const PAGE_SIZE = 20;
// How long to wait before reconnecting a dropped stream, until the server's `retry:` says.
const DEFAULT_RETRY_MS = 2000;
const ACTIVE = new Set(["queued", "started", "progress"]);
// The output fields of a resolved request that a new request may name again.
const OUTPUT_FIELDS = ["format", "sample_rate", "channels", "bit_depth", "normalization", "loudness_target"];
const MAX_SEED = 2 ** 32 - 1;  // pipeline/contract/jobs.py
// The fields that say which part of an uploaded continuation is used (resent with the clip).
const CONTINUATION_FIELDS = ["continuation_start", "continuation_end", "continuation_included"];
// A browser opens at most 6 HTTP/1.1 connections to one host and each open event stream holds
// one: a stream for every active job would leave none to enqueue or fetch audio with. So at
// most MAX_STREAMS jobs are followed by their streams; the others share one poll of the list.
const MAX_STREAMS = 4;
const POLL_MS = 4000;  // one GET /v1/jobs per poll, well within the key's api.rate

const cards = new Map();     // job id -> card (its element, latest view, stream state)
// job id -> {part, file}: the melody or continuation uploaded from this tab ("more like this" resends it)
const uploads = new Map();
let modelInfo = new Map();   // preset name -> its /v1/models entry
let nextCursor = null;
let streams = 0;             // event streams open now
const waiting = [];          // cards of active jobs without a stream, oldest first
let polling = false;

// For the browser test: every progress fraction shown per job, and each request sent.
window.progressLog = {};
window.sentRequests = [];

// ---- the key -------------------------------------------------------------------------------

function apiKey() { return $("api-key").value.trim(); }

function headers(extra) {
  const key = apiKey();
  return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
}

class ApiError extends Error {
  constructor(body, status) { super(body.message); this.body = body; this.status = status; }
}

async function failure(response) {
  try { return await response.json(); } catch (e) { return { code: "http_" + response.status, message: response.statusText }; }
}

// fetch() with the key; the JSON body, or an ApiError carrying the gateway's {code, message}.
async function call(url, init) {
  const response = await fetch(url, Object.assign({}, init, { headers: headers((init || {}).headers) }));
  if (!response.ok) throw new ApiError(await failure(response), response.status);
  return response.json();
}

function describe(error) {
  const body = error instanceof ApiError ? error.body : { code: "network_error", message: error.message };
  return body.code + ": " + body.message;
}

function showError(error) { $("error").textContent = error ? describe(error) : ""; }

// ---- the form ------------------------------------------------------------------------------

async function loadModels() {
  const info = await call("/v1/models");
  // Leaving `model` out of the request lets the deployment's default and its running
  // experiments choose; naming a preset opts the job out of experiments.
  $("model").add(new Option("default (experiments apply)", "", true, true));
  for (const model of info.models) {
    modelInfo.set(model.name, model);
    $("model").add(new Option(model.name + " (≤ " + model.max_duration + " s)", model.name));
  }
  for (const name of Object.keys(info.limits.formats)) {
    $("format").add(new Option(name, name, false, name === info.default_format));
  }
  $("duration").min = info.limits.min_duration;
  $("duration").max = info.limits.max_duration;
  $("melody").accept = info.limits.melody_formats.map((f) => "." + f).join(",") || "audio/*";
  showMelodyField();
}

// The melody upload only for presets that take one (the default entry's model is not known
// in advance: an experiment may pick another, so it offers none).
function showMelodyField() {
  const model = modelInfo.get($("model").value);
  $("melody-field").hidden = !(model && model.melody);
}

async function submitForm(event) {
  event.preventDefault();
  showError(null);
  const request = { prompt: $("prompt").value, format: $("format").value };
  if ($("model").value) request.model = $("model").value;
  if ($("duration").value) request.duration = Number($("duration").value);
  if ($("seed").value !== "") request.seed = Number($("seed").value);
  if ($("stream").checked) request.stream = true;
  const melody = $("melody-field").hidden ? null : $("melody").files[0] || null;
  $("generate").disabled = true;
  try {
    await enqueue(request, melody && { part: "melody", file: melody });
  } catch (e) {
    showError(e);
    // /v1/models does not say whether the deployment streams: the refusal is how the page
    // learns it. Untick the box so that the next Generate goes through, and say why.
    if (e instanceof ApiError && e.body.code === "unsupported_option" && e.body.field === "stream") {
      $("stream").checked = false;
      $("stream-note").textContent = "Unticked: this deployment does not stream (" + e.body.message + ").";
    }
  } finally {
    $("generate").disabled = false;
  }
}

// POST one job (JSON, or multipart with an upload, as pipeline/gateway/uploads.py reads it: a
// `request` part holding the JSON and a `melody` or `continuation` file part, `upload.part`)
// and put it on top of the history.
async function enqueue(request, upload) {
  let init;
  if (upload) {
    const form = new FormData();
    form.append("request", new Blob([JSON.stringify(request)], { type: "application/json" }));
    form.append(upload.part, upload.file, upload.file.name);
    init = { method: "POST", body: form };  // the browser writes the multipart boundary
  } else {
    init = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request) };
  }
  window.sentRequests.push(request);
  const view = await call("/v1/jobs", init);
  if (upload) uploads.set(view.id, upload);
  show(view, "top");
  return view;
}

// ---- the history ---------------------------------------------------------------------------

async function loadHistory(more) {
  if (!more) {
    for (const card of cards.values()) close(card);  // another key: stop following its jobs
    cards.clear();
    waiting.length = 0;
    $("history").replaceChildren();
    nextCursor = null;
  }
  if (!apiKey()) return;
  const query = "?limit=" + PAGE_SIZE + (more && nextCursor ? "&cursor=" + encodeURIComponent(nextCursor) : "");
  const page = await call("/v1/jobs" + query);
  for (const view of page.jobs) show(view, "bottom");  // newest first, as listed
  nextCursor = page.next_cursor;
  $("older").hidden = !nextCursor;
}

// A card for a job seen for the first time, then followed or given its audio. A job already
// shown (enqueued here while the list loaded) keeps its card: its stream knows more than the list.
function show(view, where) {
  let card = cards.get(view.id);
  if (card) return card;
  const el = $("job-card").content.firstElementChild.cloneNode(true);
  card = { el, view, final: false, closed: false, audioShown: false,
           abort: new AbortController() };
  cards.set(view.id, card);
  el.dataset.id = view.id;
  el.querySelector(".cancel").addEventListener("click", () => cancel(card));
  el.querySelector(".more").addEventListener("click", () => moreLikeThis(card));
  el.querySelector(".continue").addEventListener("click", () => continueThis(card));
  el.querySelector(".listen-partial").addEventListener("click", () => listenPartial(card));
  if (where === "top") $("history").prepend(el); else $("history").append(el);
  update(card, view);
  if (ACTIVE.has(view.status)) follow(card);
  return card;
}

function seedOf(view) {
  const seed = view.result && view.result.seed != null ? view.result.seed : view.request && view.request.seed;
  return seed == null ? null : seed;
}

function formatOf(view) {
  return (view.result && view.result.format) || (view.request && view.request.output && view.request.output.format) || "audio";
}

// "warm lo-fi piano" -> "warm-lo-fi-piano": a file name a musician can sort and recognise.
function slug(prompt) {
  const words = (prompt || "").toLowerCase().normalize("NFKD").replace(/[\u0300-\u036f]/g, "")
    .replace(/[^a-z0-9]+/g, "-").replace(/^-+/, "").slice(0, 48).replace(/-+$/, "");
  return words || "clip";
}

function fileName(view) {
  const seed = seedOf(view);
  return slug(view.request && view.request.prompt) + (seed == null ? "" : "-seed" + seed) + "." + formatOf(view);
}

function statusText(view) {
  if (view.error) {  // a cancelled job's code is its status: say it once
    const code = view.error.code === view.status ? "" : view.error.code;
    return [view.status, [code, view.error.message].filter(Boolean).join(": ")].filter(Boolean).join(" – ");
  }
  const message = view.progress && view.progress.message;
  return view.status + (message && message !== view.status ? " – " + message : "");
}

function update(card, view) {
  // A progress event carries only {id, status, progress}: keep what the full view knew.
  card.view = Object.assign({}, card.view, view);
  view = card.view;
  const el = card.el;
  const fraction = view.progress ? view.progress.fraction : 0;
  el.dataset.status = view.status;
  el.querySelector(".prompt").textContent = view.request ? view.request.prompt : view.id;
  const seed = seedOf(view);
  el.querySelector(".seed").textContent = "seed " + (seed == null ? "?" : seed);
  const request = view.request || {};
  el.querySelector(".details").textContent = [
    request.model, request.duration != null ? request.duration + " s" : null, formatOf(view),
    request.melody ? "melody" : null, request.continuation ? "continuation" : null,
    view.created_at ? new Date(view.created_at).toLocaleString() : null,
  ].filter(Boolean).join(" · ");
  if (!card.lost) el.querySelector(".status").textContent = statusText(view);
  el.querySelector("progress").value = fraction;
  el.querySelector("progress").hidden = !ACTIVE.has(view.status);
  (window.progressLog[view.id] = window.progressLog[view.id] || []).push(fraction);

  el.querySelector(".cancel").hidden = !ACTIVE.has(view.status);
  const more = el.querySelector(".more");
  more.hidden = !view.request || seed == null;
  // An upload is not kept by the gateway for the caller: only a job uploaded from this tab can
  // be varied with its tune or clip (the file is still here).
  more.disabled = (request.melody === true || request.continuation === true) && !uploads.has(view.id);
  more.title = more.disabled ? "its audio input was uploaded elsewhere; upload it again" : "";
  el.querySelector(".continue").hidden = view.status !== "succeeded" || !view.request;

  // A stream=True job's player plays its audio as it is generated (the signed URL: <audio src>
  // sends no header); offerAudio puts the finished file in its place.
  const stream = view.signed_urls && view.signed_urls.stream;
  if (ACTIVE.has(view.status) && stream && !card.streamShown) {
    card.streamShown = true;
    const player = el.querySelector(".player");
    player.preload = "auto";
    player.src = stream;
    player.hidden = false;
    el.dataset.playing = "stream";
    player.play().catch(() => {});  // autoplay may be refused: the controls still play it
  }

  if (!ACTIVE.has(view.status)) {
    card.final = true;
    el.querySelector(".partial").hidden = true;
    if (view.status === "succeeded" && !card.audioShown) offerAudio(card);
  } else if (view.partial) {  // a progress event or view of a long job past its first window
    const partial = el.querySelector(".partial");
    partial.hidden = false;
    partial.querySelector(".listen-partial").textContent =
      "Listen to the first " + Math.round(view.partial.seconds) + " s (window " +
      view.partial.window + " of " + view.partial.windows + ")";
  }
}

// The finished file in the card's player and its download link.
async function offerAudio(card) {
  card.audioShown = true;
  const view = card.view;
  const signed = view.signed_urls && view.signed_urls.audio;
  // A signed URL (or object storage's pre-signed one) plays without the key and streams; a
  // download= name only applies to a same-origin URL, which the gateway's signed one is.
  let url = signed || (view.result && view.result.download_url);
  try {
    if (!url) {
      const response = await fetch(view.urls.audio || view.audio_url, { headers: headers() });
      if (!response.ok) throw new ApiError(await failure(response), response.status);
      url = URL.createObjectURL(await response.blob());
    }
  } catch (e) {
    card.el.querySelector(".status").textContent = "succeeded – the audio could not be fetched: " + describe(e);
    card.audioShown = false;
    return;
  }
  const player = card.el.querySelector(".player");
  player.src = url;
  player.hidden = false;
  card.el.dataset.playing = "file";
  const link = card.el.querySelector(".download");
  link.href = url;
  link.download = fileName(view);
  link.textContent = "Download " + link.download;
  link.hidden = false;
}

// ---- following a job -----------------------------------------------------------------------

function follow(card) {
  if (streams >= MAX_STREAMS) {
    waiting.push(card);
    pollWaiting();
    return;
  }
  streams++;
  let freed = false;
  const done = () => {  // once per stream, however it ended
    if (freed) return;
    freed = true;
    streams--;
    nextWaiting();
  };
  const events = card.view.signed_urls && card.view.signed_urls.events;
  // data-stream says how the card is followed ("signed": EventSource, "key": fetch()).
  if (events && window.EventSource) {
    card.el.dataset.stream = "signed";
    followWithEventSource(card, events, done);
  } else {
    card.el.dataset.stream = "key";
    followWithFetch(card).finally(done);
  }
}

function close(card) {
  card.closed = true;
  card.abort.abort();  // ends its fetches, so its stream's connection is free at once
}

// A stream ended: the longest-waiting job still active gets it.
function nextWaiting() {
  while (streams < MAX_STREAMS && waiting.length) {
    const card = waiting.shift();
    if (!card.final && !card.closed) follow(card);
  }
}

// The jobs without a stream, from one listing of the key's jobs since the oldest of them: the
// list gives each one's status (a running job shows as started, without its fraction) and,
// once it has ended, its result or error.
async function pollWaiting() {
  if (polling) return;
  polling = true;
  try {
    for (;;) {
      for (let i = waiting.length - 1; i >= 0; i--) {
        if (waiting[i].final || waiting[i].closed) waiting.splice(i, 1);
      }
      if (!waiting.length) return;
      await pause(POLL_MS);
      const oldest = Math.min(...waiting.map((card) => Date.parse(card.view.created_at) || Date.now()));
      // A second earlier: the ledger keeps microseconds, a JS date only milliseconds.
      const since = new Date(oldest - 1000).toISOString();
      try {
        const page = await call("/v1/jobs?limit=100&since=" + encodeURIComponent(since));
        for (const view of page.jobs) {
          const card = cards.get(view.id);
          if (!card || !waiting.includes(card)) continue;
          // The list does not know a running job's progress: keep what the card shows.
          if (view.status === "started" && card.view.status === "progress") continue;
          update(card, view);
        }
      } catch (e) { /* the next poll tries again */ }
    }
  } finally {
    polling = false;
  }
}

function onEvent(card, event, data) {
  if (event === "progress") update(card, data);
  else if (event === "state") update(card, data);  // the whole final view; the stream ends
}

function connectionLost(card) {
  card.lost = true;
  const status = card.el.querySelector(".status");
  status.textContent = "connection lost, reconnecting…";
  status.classList.add("lost");
}

function connected(card) {
  if (!card.lost) return;
  card.lost = false;
  card.el.querySelector(".status").classList.remove("lost");
  update(card, {});
}

// A signed events URL: the browser's EventSource reconnects by itself and sends Last-Event-ID,
// so the gateway does not repeat progress the page already shows.
function followWithEventSource(card, url, done) {
  const source = new EventSource(url);
  card.abort.signal.addEventListener("abort", () => { source.close(); done(); });
  source.addEventListener("open", () => connected(card));
  source.addEventListener("progress", (e) => onEvent(card, "progress", JSON.parse(e.data)));
  source.addEventListener("state", (e) => {
    source.close();
    onEvent(card, "state", JSON.parse(e.data));
    done();
  });
  source.addEventListener("error", (e) => {
    if (card.closed) return;
    if (source.readyState === EventSource.CLOSED) {
      // Refused (an expired token, say): EventSource gives up; go on with the key instead.
      connectionLost(card);
      card.el.dataset.stream = "key";
      followWithFetch(card).finally(done);
    } else {
      connectionLost(card);  // a drop, or the gateway's own `error` event: it reconnects
    }
  });
}

// One SSE frame at a time from a fetch() response body (frames end with a blank line).
async function* sseFrames(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = { event: "message", data: "", id: null, retry: null };
      for (const line of buffer.slice(0, end).split("\n")) {
        const colon = line.indexOf(":");
        if (colon === 0) continue;  // a comment (the keepalive)
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") frame.event = value;
        else if (field === "data") frame.data += value;
        else if (field === "id") frame.id = value;
        else if (field === "retry" && /^\d+$/.test(value)) frame.retry = Number(value);
      }
      buffer = buffer.slice(end + 2);
      yield frame;
    }
  }
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The events through fetch() with the key, reconnecting (with Last-Event-ID, as EventSource
// would) whenever the stream drops before the job's final state.
async function followWithFetch(card) {
  let lastId = null;
  let retry = DEFAULT_RETRY_MS;
  while (!card.final && !card.closed) {
    try {
      const response = await fetch(card.view.urls.events, {
        headers: headers(lastId ? { "Last-Event-ID": lastId } : {}), signal: card.abort.signal });
      if (!response.ok) {
        const error = new ApiError(await failure(response), response.status);
        // A refused key or an unknown job stays so; only a busy or failing gateway is retried.
        if (response.status < 500 && response.status !== 429) throw Object.assign(error, { fatal: true });
        throw error;
      }
      connected(card);
      for await (const frame of sseFrames(response)) {
        if (frame.retry) retry = frame.retry;
        if (frame.id) lastId = frame.id;
        if (!frame.data) continue;
        if (frame.event === "error") break;  // the gateway could not read the job's state: reconnect
        onEvent(card, frame.event, JSON.parse(frame.data));
        if (card.final || card.closed) return;
      }
    } catch (e) {
      if (e.fatal) {
        card.el.querySelector(".status").textContent = describe(e);
        return;
      }
    }
    if (card.final || card.closed) return;
    connectionLost(card);
    await pause(retry);
  }
}

// What has been generated so far, as a snapshot: press again to hear further.
async function listenPartial(card) {
  const player = card.el.querySelector(".partial-player");
  try {
    // A fresh view: the partial is replaced after each window, and its signed URL (played
    // directly, streamed) is only made while one exists.
    const view = await call(card.view.urls.get);
    if (!view.urls.partial) throw new Error("the job has no partial audio now");
    if (player.src.startsWith("blob:")) URL.revokeObjectURL(player.src);
    if (view.signed_urls && view.signed_urls.partial) {
      player.src = view.signed_urls.partial;
    } else {
      const response = await fetch(view.urls.partial, { headers: headers() });
      if (!response.ok) throw new ApiError(await failure(response), response.status);
      player.src = URL.createObjectURL(await response.blob());
    }
    player.hidden = false;
    player.play().catch(() => {});
  } catch (e) {
    card.el.querySelector(".status").textContent = "partial audio: " + describe(e);
  }
}

// ---- actions -------------------------------------------------------------------------------

async function cancel(card) {
  const button = card.el.querySelector(".cancel");
  button.disabled = true;
  try {
    const answer = await call(card.view.urls.cancel, { method: "DELETE" });
    // A running job stops at its next step: the event stream brings its final state.
    card.el.dataset.cancel = "sent";
    if (!ACTIVE.has(answer.status)) update(card, { status: answer.status });
    else card.el.querySelector(".status").textContent = answer.status + " – cancelling…";
  } catch (e) {
    button.disabled = false;
    card.el.querySelector(".status").textContent = "cancel: " + describe(e);
  }
}

// The same request as `view` again, with another seed. The resolved request is used, model
// included: a variation should come from the model that made the original, even if an
// experiment chose it.
function sameRequest(view, seed) {
  const echo = view.request;
  const request = { prompt: echo.prompt, seed };
  for (const field of ["duration", "model", "temperature", "top_k", "top_p", "guidance_scale", "priority"]) {
    if (echo[field] != null) request[field] = echo[field];
  }
  for (const field of OUTPUT_FIELDS) {
    if (echo.output && echo.output[field] != null) request[field] = echo.output[field];
  }
  return request;
}

async function moreLikeThis(card) {
  const count = Math.max(1, Math.min(10, Math.floor(Number($("variations").value) || 3)));
  const seed = seedOf(card.view);
  const button = card.el.querySelector(".more");
  button.disabled = true;
  showError(null);
  try {
    for (let i = 1; i <= count; i++) {  // one at a time: the newest (seed + count) ends on top
      const request = sameRequest(card.view, (seed + i) % (MAX_SEED + 1));
      const upload = uploads.get(card.view.id) || null;
      for (const field of CONTINUATION_FIELDS) {
        if (upload && upload.part === "continuation" && card.view.request[field] != null) {
          request[field] = card.view.request[field];
        }
      }
      await enqueue(request, upload);
    }
  } catch (e) {
    showError(e);
  } finally {
    button.disabled = false;
  }
}

// The job's audio continued: its file (fetched as a blob) sent as the `continuation` part with
// the same resolved request, the clip included in the output, whose duration is the clip's
// plus the form's duration (the new seconds).
async function continueThis(card) {
  const button = card.el.querySelector(".continue");
  button.disabled = true;
  showError(null);
  try {
    const view = card.view;
    const signed = view.signed_urls && view.signed_urls.audio;
    const response = signed ? await fetch(signed)
      : await fetch(view.urls.audio || view.audio_url, { headers: headers() });
    if (!response.ok) throw new ApiError(await failure(response), response.status);
    const clip = new File([await response.blob()], fileName(view));
    const request = sameRequest(view, null);
    delete request.seed;  // a new seed: the continuation is new music
    const added = Number($("duration").value) || 8;
    request.duration = Math.round((view.result.duration + added) * 1000) / 1000;
    request.continuation_included = true;
    await enqueue(request, { part: "continuation", file: clip });
  } catch (e) {
    showError(e);
  } finally {
    button.disabled = false;
  }
}

// ---- start ---------------------------------------------------------------------------------

$("job-form").addEventListener("submit", submitForm);
$("model").addEventListener("change", showMelodyField);
$("older").addEventListener("click", () => loadHistory(true).catch(showError));
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORAGE, apiKey());
  showError(null);
  loadHistory(false).catch(showError);
});
$("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
loadModels().catch(showError);
loadHistory(false).catch(showError);
