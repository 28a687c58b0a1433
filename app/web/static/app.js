// The upload page: pick or drop a photo, POST it to /segment/json, show mask, overlay and legend.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("upload-form"), input = $("image"), drop = $("drop-zone"), submit = $("submit");
const errorBox = $("error"), statusBox = $("status"), results = $("results");
const maxBytes = Number(document.body.dataset.maxBytes);
let file = null, originalUrl = null;

const MESSAGES = {
  400: "That file could not be read as a picture: it may be damaged or cut short.",
  413: "That file is too large for this server.",
  415: "That file is not an image this service can read. Try a JPEG, PNG, WebP, BMP or TIFF photo.",
  422: "The upload did not contain a photo.",
  503: "The service cannot segment right now.",
};

function showError(text) {
  results.hidden = true;  // never leave an earlier result beside a new error
  errorBox.textContent = text;
  errorBox.hidden = false;
  statusBox.textContent = "";
}

function choose(f) {
  errorBox.hidden = true;
  if (!f) return;
  if (f.size > maxBytes) {
    showError(`${MESSAGES[413]} (${(f.size / 1048576).toFixed(1)} MB; the limit is ${(maxBytes / 1048576).toFixed(0)} MB)`);
    return;
  }
  file = f;
  results.hidden = true;
  statusBox.textContent = "";
  if (originalUrl) URL.revokeObjectURL(originalUrl);
  originalUrl = URL.createObjectURL(f);
  const preview = $("preview");
  preview.onerror = () => { preview.hidden = true; };  // not a picture the browser can show: no broken icon
  preview.src = originalUrl;
  preview.alt = `Preview of ${f.name}`;
  preview.hidden = false;
  $("drop-text").innerHTML = `<strong>${escapeHtml(f.name)}</strong><br><small>${(f.size / 1024).toFixed(0)} KB · choose another or drop one here</small>`;
  submit.disabled = false;
  submit.focus();
}

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

input.addEventListener("change", () => choose(input.files[0]));
["dragenter", "dragover"].forEach((e) => drop.addEventListener(e, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((e) => drop.addEventListener(e, (ev) => { ev.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (ev) => choose(ev.dataTransfer.files[0]));
drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); input.click(); } });
drop.tabIndex = 0;

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!file) return;
  errorBox.hidden = true;
  submit.disabled = true;
  statusBox.textContent = "Segmenting…";
  const body = new FormData();
  body.append("image", file, file.name);
  try {
    const res = await postRetryingOnce(`/segment/json?model=${encodeURIComponent(chosenModel())}`, body);
    const data = await res.json().catch(() => ({}));
    if (!res.ok) {
      // The plain-words message, plus the server's detail where it adds facts (sizes, limits, reasons).
      const detail = typeof data.detail === "string" && res.status !== 415 ? ` ${data.detail}.` : "";
      showError((MESSAGES[res.status] || `The server answered ${res.status}.`) + detail);
      return;
    }
    await show(data);
    statusBox.textContent = `Done in ${Object.values(data.timings_ms).reduce((a, b) => a + b, 0).toFixed(0)} ms`;
  } catch (err) {
    showError("The server could not be reached. Is it still running?");
  } finally {
    submit.disabled = false;
  }
});

// Tried once more, after the server's Retry-After (at most RETRY_CAP_S seconds; 1 s without one): a 503 with
// Retry-After (the server busy, or a Ray replica lost), a 5xx that is not the service's own JSON answer (a proxy in
// front: Ray Serve's answers 500 for a request whose replica was lost with its node) or no answer at all. A second
// failure is the caller's to show.
const RETRY_CAP_S = 5;

async function postRetryingOnce(url, body) {
  let wait;
  try {
    const res = await fetch(url, { method: "POST", body });
    const after = res.headers.get("Retry-After");
    const fromProxy = res.status >= 500 && !(res.headers.get("Content-Type") || "").includes("json");
    if (!(res.status === 503 && after !== null) && !fromProxy) return res;
    wait = Number(after ?? 1);
    if (!Number.isFinite(wait) || wait < 0) wait = 1;  // an HTTP date, or nonsense
  } catch (err) {
    wait = 1;
  }
  statusBox.textContent = "The server is busy: retrying…";
  await new Promise((resolve) => setTimeout(resolve, Math.min(wait, RETRY_CAP_S) * 1000));
  statusBox.textContent = "Segmenting…";
  return fetch(url, { method: "POST", body });
}

// The model picker: the loaded models, the default selected; the header and the next request follow the choice.
const picker = $("model-picker");

function chosenModel() {
  return picker && picker.value ? picker.value : "";
}

function showModel() {
  const option = picker && picker.selectedOptions[0];
  if (!option) return;
  $("model-name").textContent = option.value;
  $("model-meta").textContent = option.dataset.meta;
  $("untrained-badge").style.display = option.dataset.trained === "yes" ? "none" : "";
  $("model-name").title = `Classes: ${JSON.parse(option.dataset.classes || "[]").join(", ")}`;
}

if (picker) picker.addEventListener("change", () => { results.hidden = true; showModel(); });

function loaded(img, src) {
  return new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; img.src = src; });
}

async function show(data) {
  const original = $("original"), mask = $("mask");
  const maskUrl = `data:image/png;base64,${data.mask_png}`;
  await Promise.all([loaded(original, originalUrl), loaded(mask, maskUrl)]);
  $("download-mask").href = maskUrl;
  $("download-labels").href = `data:image/png;base64,${data.labels_png}`;
  results.hidden = false;
  drawOverlay();

  const legend = $("legend");
  legend.replaceChildren(...data.classes.map((c) => {
    const li = document.createElement("li");
    li.innerHTML = `<span class="swatch" style="background:${c.color}" aria-hidden="true"></span>` +
      `<span class="name">${escapeHtml(c.name)}</span><span class="pct">${c.percent.toFixed(1)}%</span>`;
    li.dataset.percent = c.percent;
    return li;
  }));

  const timings = $("timings");
  timings.replaceChildren(...Object.entries(data.timings_ms).flatMap(([stage, ms]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = stage;
    dd.textContent = `${ms.toFixed(1)} ms`;
    return [dt, dd];
  }));
  results.scrollIntoView({ behavior: "smooth", block: "start" });
}

function drawOverlay() {
  const original = $("original"), mask = $("mask"), canvas = $("overlay");
  const alpha = Number($("opacity").value) / 100;
  canvas.width = original.naturalWidth;
  canvas.height = original.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.globalAlpha = 1;
  ctx.drawImage(original, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = alpha;
  ctx.drawImage(mask, 0, 0, canvas.width, canvas.height);
  $("opacity-value").textContent = `${Math.round(alpha * 100)}%`;
  canvas.dataset.alpha = alpha;
}

$("opacity").addEventListener("input", drawOverlay);
$("download-overlay").addEventListener("click", () => { $("download-overlay").href = $("overlay").toDataURL("image/png"); });
