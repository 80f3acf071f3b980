// The gateway's page: enqueue a job, follow its Server-Sent Events, play and offer the file.
// EventSource and <audio src> cannot send an Authorization header, so the events are read from
// a fetch() stream and the audio is fetched into a blob URL (or played from a pre-signed URL).
"use strict";

const $ = (id) => document.getElementById(id);
// Every progress fraction the page showed, in order (the browser test reads it).
window.progressLog = [];

function headers(extra) {
  const key = $("api-key").value.trim();
  return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
}

function showError(body) {
  $("error").textContent = body && body.code ? body.code + ": " + body.message : String(body);
}

async function failure(response) {
  try { return await response.json(); } catch (e) { return { code: "http_" + response.status, message: response.statusText }; }
}

function showProgress(view) {
  const fraction = view.progress ? view.progress.fraction : 0;
  $("progress").value = fraction;
  $("status").textContent = view.status + (view.progress && view.progress.message ? " – " + view.progress.message : "");
  window.progressLog.push(fraction);
}

async function loadModels() {
  const response = await fetch("/v1/models");
  if (!response.ok) { showError(await failure(response)); return; }
  const info = await response.json();
  for (const model of info.models) {
    const option = new Option(model.name + " (≤ " + model.max_duration + " s)", model.name);
    option.selected = model.name === info.default_model;
    $("model").add(option);
  }
  for (const name of Object.keys(info.limits.formats)) {
    $("format").add(new Option(name, name, false, name === info.default_format));
  }
  $("duration").min = info.limits.min_duration;
  $("duration").max = info.limits.max_duration;
}

// Server-Sent Events over fetch: frames are separated by a blank line.
async function follow(jobId) {
  const response = await fetch("/v1/jobs/" + encodeURIComponent(jobId) + "/events", { headers: headers() });
  if (!response.ok) { showError(await failure(response)); return null; }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;  // a keep-alive comment
      const body = JSON.parse(data);
      if (event === "progress") showProgress(body);
      else if (event === "state") { showProgress(body); return body; }
      else if (event === "error") { showError(body); return null; }
    }
  }
}

async function offer(view) {
  let url = view.result && view.result.download_url;
  if (!url) {
    const response = await fetch(view.audio_url, { headers: headers() });
    if (!response.ok) { showError(await failure(response)); return; }
    url = URL.createObjectURL(await response.blob());
  }
  $("player").src = url;
  $("download").href = url;
  $("download").download = view.id + "." + view.result.format;
  $("done").hidden = false;
}

async function submit(event) {
  event.preventDefault();
  $("error").textContent = "";
  $("done").hidden = true;
  $("progress").value = 0;
  window.progressLog = [];
  $("generate").disabled = true;
  try {
    const request = { prompt: $("prompt").value, model: $("model").value, format: $("format").value };
    if ($("duration").value) request.duration = Number($("duration").value);
    const response = await fetch("/v1/jobs", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(request),
    });
    if (!response.ok) { showError(await failure(response)); return; }
    const job = await response.json();
    showProgress(job);
    const final = await follow(job.id);
    if (!final) return;
    if (final.status === "succeeded") await offer(final);
    else showError(final.error || { code: final.status, message: "the job did not succeed" });
  } catch (e) {
    showError({ code: "network_error", message: e.message });
  } finally {
    $("generate").disabled = false;
  }
}

$("job-form").addEventListener("submit", submit);
loadModels().catch((e) => showError({ code: "network_error", message: e.message }));
