// Live mode: camera frames (JPEG) over the WebSocket /ws/segment, one PNG back per frame segmented.
// The server segments the newest frame and drops the ones it had no time for; this page sends at most one frame
// ahead of the socket (never a backlog in the browser either) and shows the rate, the latency and the drops.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const startBtn = $("live-start"), stopBtn = $("live-stop"), viewSel = $("live-view"), camera = $("live-camera");
  const result = $("live-result"), errorBox = $("live-error");
  const canvas = document.createElement("canvas");
  const SEND_EVERY_MS = 1000 / 30;
  let ws = null, stream = null, timer = null, encoding = false, header = null, resultUrl = null;
  let sent = 0, received = 0, sentAt = new Map(), doneAt = [];

  function showError(text) { errorBox.textContent = text; errorBox.hidden = !text; }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const picker = $("model-picker");  // the page's model picker, when several models are loaded
    const model = picker && picker.value ? `&model=${encodeURIComponent(picker.value)}` : "";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/segment?view=${viewSel.value}${model}`);
    socket.binaryType = "blob";
    sent = 0; sentAt = new Map(); header = null;  // the server numbers frames per connection, from 0
    socket.onmessage = (ev) => (typeof ev.data === "string" ? onHeader(JSON.parse(ev.data)) : onPng(ev.data));
    socket.onclose = (ev) => {
      if (ws === socket && stream) showError(`The live connection closed${ev.reason ? `: ${ev.reason}` : ""}.`);
    };
    return socket;
  }

  function onHeader(h) {
    if (h.error) { showError(`Frame ${h.frame}: ${h.error}`); return; }
    header = h;
    $("live-dropped").textContent = String(h.dropped);
  }

  function onPng(blob) {
    if (!header) return;
    const now = performance.now(), t0 = sentAt.get(header.frame);
    for (const k of sentAt.keys()) if (k <= header.frame) sentAt.delete(k);
    if (resultUrl) URL.revokeObjectURL(resultUrl);
    resultUrl = URL.createObjectURL(blob);
    result.src = resultUrl;
    received += 1;
    result.dataset.frame = String(header.frame);
    $("live-received").textContent = String(received);
    if (t0 !== undefined) $("live-latency").textContent = `${Math.round(now - t0)} ms`;
    doneAt.push(now);
    while (doneAt.length && now - doneAt[0] > 2000) doneAt.shift();
    if (doneAt.length > 1) {
      $("live-fps").textContent = ((doneAt.length - 1) * 1000 / (now - doneAt[0])).toFixed(1);
    }
    header = null;
  }

  function sendFrame() {
    if (!ws || ws.readyState !== WebSocket.OPEN || encoding || ws.bufferedAmount > 0) return;
    if (!camera.videoWidth) return;
    canvas.width = camera.videoWidth; canvas.height = camera.videoHeight;
    canvas.getContext("2d").drawImage(camera, 0, 0);
    encoding = true;
    const socket = ws, at = performance.now();
    canvas.toBlob((blob) => {
      encoding = false;
      if (!blob || socket !== ws || socket.readyState !== WebSocket.OPEN) return;
      sentAt.set(sent, at);
      sent += 1;
      socket.send(blob);
    }, "image/jpeg", 0.8);
  }

  async function start() {
    showError("");
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    } catch (e) {
      showError(`The camera could not be opened (${e.name}): allow camera access, or use a device with a camera.`);
      return;
    }
    camera.srcObject = stream;
    received = 0; doneAt = [];
    ws = connect();
    timer = setInterval(sendFrame, SEND_EVERY_MS);
    startBtn.disabled = true; stopBtn.disabled = false;
  }

  function stop() {
    clearInterval(timer); timer = null;
    if (ws) { const socket = ws; ws = null; socket.close(); }
    if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; }
    camera.srcObject = null;
    startBtn.disabled = false; stopBtn.disabled = true;
  }

  startBtn.addEventListener("click", start);
  stopBtn.addEventListener("click", stop);
  const reconnect = () => { if (ws) { const old = ws; ws = connect(); old.close(); } };
  viewSel.addEventListener("change", reconnect);
  if ($("model-picker")) $("model-picker").addEventListener("change", reconnect);
  window.addEventListener("pagehide", stop);
})();
