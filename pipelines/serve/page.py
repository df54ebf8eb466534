"""The page the Serve app answers at ``GET /``, and the sample images it offers (``GET /v1/samples``).

One self-contained HTML document (inline CSS and JS, no external assets: it works with no network): pick
an image (upload or a sample), an endpoint among the deployed models (``GET /v1/models``), send it as
``multipart/form-data`` field ``file`` (as a browser form does), then draw the boxes (and, for
``/v1/segment``, the masks: COCO's compressed RLE decoded in JS, :data:`RLE_JS`) on a canvas, list the
answer in a table and show the ``Server-Timing`` entries.

The samples are built-in shapes images (``vision.data.synth``'s drawing code), drawn on first request and
kept: no files, no downloads. Plain Python and numpy here; the Ingress serves both.
"""
from __future__ import annotations

import functools
import io

import numpy as np
from pydantic import BaseModel

SAMPLE_COUNT = 4
SAMPLE_SIZE = 256  # pixels, square
SAMPLE_SEED = 20260


class Sample(BaseModel):
    name: str
    url: str  # relative to the app's root
    width: int
    height: int


class SamplesAnswer(BaseModel):
    samples: list[Sample]


def samples() -> dict:
    """``GET /v1/samples``: the sample images, by URL relative to the app's root."""
    return {"samples": [{"name": f"shapes {n}", "url": f"v1/samples/{n}.png", "width": SAMPLE_SIZE,
                         "height": SAMPLE_SIZE} for n in range(SAMPLE_COUNT)]}


@functools.lru_cache(maxsize=SAMPLE_COUNT)
def sample_png(n: int) -> bytes:
    """PNG bytes of sample ``n`` (0 <= n < SAMPLE_COUNT): 2 to 4 shapes on a textured background, the same
    bytes on every call and every replica."""
    from PIL import Image

    from vision.data.synth import _render_image

    if not 0 <= n < SAMPLE_COUNT:
        raise IndexError(f"sample {n} does not exist; there are {SAMPLE_COUNT} (0..{SAMPLE_COUNT - 1})")
    rng = np.random.default_rng([SAMPLE_SEED, n])
    pixels, _ = _render_image(rng, SAMPLE_SIZE, int(rng.integers(2, 5)), crowd=False)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


# COCO's compressed RLE string -> mask, as pycocotools' rleFrString + rleDecode. Counts alternate runs of
# zeros and ones, column-major, starting with zeros; each count is 5-bit groups (char - 48, bit 0x20 =
# more groups, bit 0x10 of the last = negative), and from the third on a delta to the count two before.
RLE_JS = r"""
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k);
      if (p > s.length) throw new Error("truncated RLE string");
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// {size: [h, w], counts: "..."} -> Uint8Array of h * w, row-major (1 = in the mask).
function rleDecode(rle) {
  const h = rle.size[0], w = rle.size[1], n = h * w;
  const out = new Uint8Array(n);
  let i = 0, on = 0;
  for (const run of rleCounts(rle.counts)) {
    const end = Math.min(n, i + run);
    if (on) for (let j = i; j < end; j++) out[(j % h) * w + Math.floor(j / h)] = 1;
    i = end;
    on ^= 1;
  }
  return out;
}
"""

_STYLE = r"""
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dee7; --bg: #f5f7fa; --accent: #2457c5; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); }
header { padding: 12px 20px; background: #fff; border-bottom: 1px solid var(--line); display: flex;
         align-items: baseline; gap: 14px; }
header h1 { font-size: 18px; margin: 0; }
header span, header a { color: var(--muted); font-size: 13px; }
main { display: grid; grid-template-columns: 300px minmax(0, 1fr); gap: 20px; padding: 20px; align-items: start; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; }
.card h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); margin: 0 0 10px; }
form label { display: block; margin: 0 0 12px; font-weight: 600; }
form label small { font-weight: 400; color: var(--muted); }
form input, form select { display: block; width: 100%; margin-top: 4px; font: inherit; padding: 5px 6px;
                          border: 1px solid var(--line); border-radius: 5px; background: #fff; }
.row { display: flex; gap: 10px; }
.row label { flex: 1; }
#samples { display: grid; grid-template-columns: repeat(4, 1fr); gap: 6px; margin: 4px 0 14px; }
#samples button { padding: 0; border: 2px solid transparent; border-radius: 5px; background: none; cursor: pointer; }
#samples button.picked { border-color: var(--accent); }
#samples img { display: block; width: 100%; border-radius: 3px; }
button#run { width: 100%; padding: 8px; font: inherit; font-weight: 600; color: #fff; background: var(--accent);
             border: 0; border-radius: 5px; cursor: pointer; }
button#run:disabled { opacity: .55; cursor: default; }
#status { margin-top: 10px; min-height: 1.4em; color: var(--muted); overflow-wrap: anywhere; }
#status.error { color: var(--bad); font-weight: 600; }
.view { display: flex; flex-direction: column; gap: 16px; min-width: 0; }
.side { display: flex; flex-direction: column; gap: 16px; }
.side small { color: var(--muted); }
#model-info { display: block; margin-top: 4px; font-weight: 400; overflow-wrap: anywhere; }
#canvas { background: repeating-conic-gradient(#e9edf3 0 25%, #fff 0 50%) 0 0 / 16px 16px;
          border: 1px solid var(--line); border-radius: 6px; max-width: 100%; }
#canvas.empty { width: 480px; height: 320px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { font-size: 12px; color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px;
          vertical-align: -1px; }
#results { width: auto; min-width: 50%; }
#results td, #results th { padding: 4px 14px 4px 8px; }
#timings { margin-bottom: 6px; }
#timings td { padding: 3px 6px; }
.bar { display: inline-block; height: 8px; background: var(--accent); border-radius: 2px; vertical-align: 0; }
#meta { color: var(--muted); margin: 0 0 8px; }
@media (max-width: 800px) { main { grid-template-columns: 1fr; } }
"""

_BODY = r"""
<header><h1>visionflow</h1><span>detect, segment, classify: try the deployed models</span>
  <a href="docs">API docs</a></header>
<main>
  <div class="side">
  <section class="card">
    <h2>Input</h2>
    <form id="form">
      <label for="file">Image <small>(JPEG or PNG)</small>
        <input type="file" id="file" name="file" accept="image/jpeg,image/png"></label>
      <div><b>or a sample</b> <small>(built-in shapes)</small></div>
      <div id="samples"></div>
      <label for="endpoint">Endpoint and model
        <select id="endpoint" name="endpoint"></select><small id="model-info"></small></label>
      <div class="row">
        <label for="score_threshold">Min score
          <input type="number" id="score_threshold" name="score_threshold" min="0" max="1" step="0.05"
                 placeholder="default"></label>
        <label for="max_detections">Max results
          <input type="number" id="max_detections" name="max_detections" min="1" max="1000" value="10"></label>
      </div>
      <button type="submit" id="run" disabled>Run</button>
    </form>
    <div id="status" role="status">Loading the deployed models...</div>
  </section>
  <section class="card">
    <h2>Timings (ms)</h2>
    <table id="timings"><tbody></tbody></table>
    <small>the answer's <code>Server-Timing</code>, and the round trip seen by the browser</small>
  </section>
  </div>
  <section class="view">
    <div class="card">
      <h2>Result</h2>
      <p id="meta">Pick an image.</p>
      <canvas id="canvas" class="empty" width="480" height="320"></canvas>
    </div>
    <div class="card">
      <h2 id="results-title">Detections</h2>
      <table id="results"><thead><tr><th>#</th><th>label</th><th class="num">category_id</th>
        <th class="num">score</th><th class="num">box (x1, y1, x2, y2)</th><th class="num">mask px</th></tr></thead>
        <tbody></tbody></table>
    </div>
  </section>
</main>
"""

_SCRIPT = r"""
const TASK_ENDPOINT = {detection: "detect", segmentation: "segment", classification: "classify"};
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#008080", "#f032e6", "#9a6324",
                "#800000", "#000075", "#808000", "#469990"];
const $ = (id) => document.getElementById(id);
const state = {blob: null, name: null, image: null, last: null};
window.visionflow = {rleDecode, rleCounts, state, run};

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function setState(s) { document.body.dataset.state = s; }

// A request ended (answered or not): tests wait for the count to grow.
function finish(s) {
  setState(s);
  document.body.dataset.runs = Number(document.body.dataset.runs || 0) + 1;
  $("run").disabled = !state.blob;
}

async function init() {
  setState("loading");
  try {
    const [models, samples] = await Promise.all([
      fetch("v1/models").then((r) => r.json()), fetch("v1/samples").then((r) => r.json())]);
    for (const m of models.models) {
      const o = document.createElement("option");
      o.value = TASK_ENDPOINT[m.task] + "|" + m.name;
      o.textContent = "/v1/" + TASK_ENDPOINT[m.task] + " \u2014 " + m.name;
      o.dataset.info = m.arch + ", " + m.num_classes + " classes, " + m.image_size + " px, " + m.source;
      $("endpoint").append(o);
    }
    for (const s of samples.samples) {
      const b = document.createElement("button");
      b.type = "button"; b.title = s.name; b.dataset.url = s.url;
      const img = document.createElement("img");
      img.src = s.url; img.alt = s.name;
      b.append(img);
      b.addEventListener("click", () => pickSample(b, s));
      $("samples").append(b);
    }
    showModel();
    const none = !models.models.length;
    setStatus(none ? "No model is deployed." : "Upload an image or pick a sample.", none);
    setState("idle");
  } catch (e) {
    setStatus("Could not reach the API: " + e, true);
    setState("error");
  }
}

async function pickSample(button, s) {
  document.querySelectorAll("#samples button").forEach((x) => x.classList.toggle("picked", x === button));
  $("file").value = "";
  const r = await fetch(s.url);
  await useImage(await r.blob(), s.name.replace(/ /g, "_") + ".png");
}

async function useImage(blob, name) {
  state.blob = blob; state.name = name;
  state.image = await createImageBitmap(blob);
  $("run").disabled = false;
  await run();
}

$("file").addEventListener("change", async () => {
  const f = $("file").files[0];
  if (!f) return;
  document.querySelectorAll("#samples button").forEach((x) => x.classList.remove("picked"));
  try { await useImage(f, f.name); }
  catch (e) { setStatus("Not an image the browser can show: " + e, true); setState("error"); }
});
function showModel() {
  const o = $("endpoint").selectedOptions[0];
  $("model-info").textContent = o ? o.dataset.info : "";
}
$("endpoint").addEventListener("change", () => { showModel(); if (state.blob) run(); });
$("form").addEventListener("submit", (e) => { e.preventDefault(); if (state.blob) run(); });

function timings(header) {
  // "preprocess;dur=1.234, model;dur=..." -> [[name, ms], ...]
  return (header || "").split(",").map((p) => p.trim()).filter(Boolean).map((p) => {
    const [name, ...params] = p.split(";");
    const dur = params.map((q) => q.trim()).find((q) => q.startsWith("dur="));
    return [name.trim(), dur ? parseFloat(dur.slice(4)) : NaN];
  });
}

async function run() {
  const [endpoint, model] = $("endpoint").value.split("|");
  if (!endpoint) { setStatus("No model is deployed.", true); return; }
  if (!state.blob) { setStatus("Pick an image first.", true); return; }
  const q = new URLSearchParams({model});
  for (const id of ["score_threshold", "max_detections"]) if ($(id).value !== "") q.set(id, $(id).value);
  const body = new FormData();
  body.append("file", state.blob, state.name || "image");
  setState("running"); $("run").disabled = true;
  setStatus("POST /v1/" + endpoint + " ...");
  const t0 = performance.now();
  let r, answer;
  try {
    r = await fetch("v1/" + endpoint + "?" + q, {method: "POST", body});
    answer = await r.json();
  } catch (e) {
    setStatus("Request failed: " + e, true); finish("error"); return;
  }
  const roundTrip = performance.now() - t0;
  state.last = answer;
  if (!r.ok) {
    const err = answer.error || {code: "?", message: JSON.stringify(answer)};
    setStatus(r.status + " " + err.code + ": " + err.message, true);
    draw([]); fillTable(endpoint, []); fillTimings([], roundTrip);
    finish("error");
    return;
  }
  const items = answer.detections || answer.predictions || [];
  setStatus(r.status + " OK: " + items.length + (answer.detections ? " detection(s)" : " class(es)"));
  $("meta").textContent = answer.model + " (" + answer.task + ") on " + state.name + ", " +
    answer.image.width + " x " + answer.image.height + " px";
  draw(answer.detections || [], answer.predictions || []);
  fillTable(endpoint, items);
  fillTimings(timings(r.headers.get("server-timing")), roundTrip);
  finish("done");
}

function fillTimings(entries, roundTrip) {
  const tb = $("timings").tBodies[0];
  tb.replaceChildren();
  const rows = entries.concat([["round trip", roundTrip]]);
  const max = Math.max(...rows.map((e) => e[1]).filter(Number.isFinite), 1e-9);
  for (const [name, ms] of rows) {
    const tr = tb.insertRow();
    tr.dataset.name = name;
    tr.insertCell().textContent = name;
    const td = tr.insertCell(); td.className = "num"; td.textContent = Number.isFinite(ms) ? ms.toFixed(1) : "?";
    const bar = document.createElement("span"); bar.className = "bar";
    bar.style.width = Math.max(1, Math.round(60 * (Number.isFinite(ms) ? ms : 0) / max)) + "px";
    tr.insertCell().append(bar);
  }
}

function fillTable(endpoint, items) {
  const classify = endpoint === "classify";
  $("results-title").textContent = classify ? "Predictions" : (endpoint === "segment" ? "Instances" : "Detections");
  document.querySelectorAll("#results th").forEach((th, k) => {
    if (k >= 4) th.hidden = classify || (k === 5 && endpoint !== "segment");
  });
  const tb = $("results").tBodies[0];
  tb.replaceChildren();
  items.forEach((d, i) => {
    const tr = tb.insertRow();
    tr.dataset.label = d.label; tr.dataset.score = d.score; tr.dataset.categoryId = d.category_id;
    const idx = tr.insertCell();
    const sw = document.createElement("span"); sw.className = "swatch"; sw.style.background = COLORS[i % COLORS.length];
    idx.append(sw, String(i + 1));
    tr.insertCell().textContent = d.label;
    const c = tr.insertCell(); c.className = "num"; c.textContent = d.category_id;
    const s = tr.insertCell(); s.className = "num"; s.textContent = d.score.toFixed(3);
    if (classify) return;
    tr.dataset.box = JSON.stringify(d.box);
    const b = tr.insertCell(); b.className = "num"; b.textContent = d.box.map((v) => v.toFixed(1)).join(", ");
    const m = tr.insertCell(); m.className = "num";
    m.hidden = endpoint !== "segment";
    if (d.mask) {
      const px = rleDecode(d.mask).reduce((a, v) => a + v, 0);
      tr.dataset.maskPixels = px; m.textContent = px;
    }
  });
}

function draw(dets, preds) {
  const cv = $("canvas"), img = state.image;
  if (!img) return;
  const scale = Math.min(4, 640 / Math.max(img.width, img.height));
  cv.classList.remove("empty");
  cv.width = Math.round(img.width * scale); cv.height = Math.round(img.height * scale);
  const g = cv.getContext("2d");
  g.imageSmoothingEnabled = scale < 1;
  g.drawImage(img, 0, 0, cv.width, cv.height);
  // Masks: one overlay at the image's own size, scaled like the image.
  const masked = dets.filter((d) => d.mask);
  if (masked.length) {
    const [h, w] = masked[0].mask.size;
    const off = new OffscreenCanvas(w, h), og = off.getContext("2d"), data = og.createImageData(w, h);
    dets.forEach((d, i) => {
      if (!d.mask) return;
      const m = rleDecode(d.mask), rgb = hex(COLORS[i % COLORS.length]);
      for (let p = 0; p < m.length; p++) if (m[p]) {
        data.data.set([rgb[0], rgb[1], rgb[2], 110], 4 * p);
      }
    });
    og.putImageData(data, 0, 0);
    g.drawImage(off, 0, 0, cv.width, cv.height);
  }
  // Boxes, then their labels over all of them, best first; a label goes where it overlaps no label already
  // placed, else it is left out (the table lists every one).
  const boxes = dets.map((d) => d.box.map((v) => v * scale));
  boxes.forEach(([x1, y1, x2, y2], i) => {
    g.lineWidth = 2; g.strokeStyle = COLORS[i % COLORS.length];
    g.strokeRect(x1, y1, Math.max(1, x2 - x1), Math.max(1, y2 - y1));
  });
  g.font = "600 12px system-ui, 'DejaVu Sans', sans-serif";
  g.textBaseline = "top";
  const placed = [];
  const overlaps = (r) => placed.some((p) => r.x < p.x + p.w && p.x < r.x + r.w &&
                                             r.y < p.y + p.h && p.y < r.y + r.h);
  dets.forEach((d, i) => {
    const col = COLORS[i % COLORS.length];
    const [x1, y1, x2, y2] = boxes[i];
    const text = (i + 1) + " " + d.label + " " + d.score.toFixed(2);
    const tw = g.measureText(text).width + 8, th = 17;
    const spots = [[x1, y1 - th], [x1, y1], [x1, y2], [x2 - tw, y2 - th]];
    for (const [sx, sy] of spots) {
      const r = {x: Math.min(Math.max(0, sx), cv.width - tw), y: Math.min(Math.max(0, sy), cv.height - th),
                 w: tw, h: th};
      if (overlaps(r)) continue;
      placed.push(r);
      g.fillStyle = col; g.fillRect(r.x, r.y, r.w, r.h);
      g.fillStyle = "#fff"; g.fillText(text, r.x + 4, r.y + 2);
      break;
    }
  });
  if (preds && preds.length) {  // classify: the best class over the image
    const text = preds[0].label + " " + preds[0].score.toFixed(3);
    g.font = "600 16px system-ui, 'DejaVu Sans', sans-serif";
    const tw = g.measureText(text).width + 12;
    g.fillStyle = "rgba(20, 24, 33, .78)"; g.fillRect(8, 8, tw, 26);
    g.fillStyle = "#fff"; g.fillText(text, 14, 13);
  }
}

function hex(c) { return [1, 3, 5].map((k) => parseInt(c.slice(k, k + 2), 16)); }

init();
"""

PAGE_HTML = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             "<title>visionflow: try the models</title>\n<style>" + _STYLE + "</style></head>\n"
             "<body data-state=\"loading\">"
             + _BODY + "<script>" + RLE_JS + _SCRIPT + "</script>\n</body></html>\n")
