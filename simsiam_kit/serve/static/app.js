// simsiam-kit search page: upload or drop an image, see its neighbours, click one to search from it.
// Plain JavaScript, no build step, nothing fetched but this server's own endpoints.
"use strict";

const $ = (id) => document.getElementById(id);
let lastQuery = null; // {file} or {row}: what "change k" searches again
let maxK = 100;
let latest = 0; // only the newest search may draw: an older answer arriving late is dropped
let objectURL = null; // the preview of the picked file, revoked when another replaces it

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function getJSON(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.detail) || `HTTP ${response.status}`);
  }
  return body;
}

function kValue() {
  const k = parseInt($("k").value, 10);
  if (!Number.isFinite(k) || k < 1) return 1;
  return Math.min(k, maxK);
}

function showQuery(src, caption) {
  $("query").hidden = false;
  $("query-img").src = src;
  $("query-caption").textContent = caption;
}

function render(result) {
  const grid = $("grid");
  grid.replaceChildren();
  $("grid-title").hidden = false;
  let note = `${result.neighbours.length} neighbours, ${result.index.kind} index`;
  if (result.approximate) {
    note += result.recall != null
      ? ` (approximate, measured recall ${(100 * result.recall).toFixed(1)} %)`
      : " (approximate, recall not measured)";
  }
  $("grid-title").textContent = note;
  for (const n of result.neighbours) {
    const fig = document.createElement("figure");
    fig.className = "tile";
    fig.dataset.row = n.row;
    fig.title = `row ${n.row}: ${n.id} - click to search from this image`;
    const img = document.createElement("img");
    img.src = n.thumbnail;
    img.alt = String(n.id);
    img.loading = "lazy";
    const cap = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = n.score.toFixed(3);
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${n.rank}`;
    cap.append(rank, " ", score);
    const label = n["class"] != null ? n["class"] : n.label;
    if (label != null) {
      const lab = document.createElement("span");
      lab.className = "label";
      lab.textContent = String(label);
      cap.append(document.createElement("br"), lab);
    }
    fig.append(img, cap);
    fig.addEventListener("click", () => searchRow(n.row, n));
    grid.append(fig);
  }
  document.body.dataset.ready = "1";
}

async function run(request, what) {
  const mine = ++latest;
  document.body.dataset.ready = "0";
  setStatus(`searching ${what}\u2026`, false);
  const t0 = performance.now();
  try {
    const result = await getJSON(await request());
    if (mine !== latest) return;
    render(result);
    setStatus(`${what}: ${(performance.now() - t0).toFixed(0)} ms`, false);
  } catch (e) {
    if (mine !== latest) return;
    $("grid").replaceChildren();
    setStatus(e.message, true);
    document.body.dataset.ready = "error";
  }
}

function searchFile(file) {
  lastQuery = { file };
  if (objectURL) URL.revokeObjectURL(objectURL);
  objectURL = URL.createObjectURL(file);
  showQuery(objectURL, file.name);
  const body = new FormData();
  body.append("image", file);
  return run(() => fetch(`/search?k=${kValue()}`, { method: "POST", body }), file.name);
}

function searchRow(row, item) {
  lastQuery = { row, item };
  const label = item && (item["class"] != null ? item["class"] : item.label);
  showQuery(`/items/${row}/thumbnail`, `row ${row}` + (item ? `: ${item.id}` : "") + (label != null ? ` (${label})` : ""));
  return run(() => fetch(`/items/${row}/neighbours?k=${kValue()}`), `row ${row}`);
}

function again() {
  if (!lastQuery) return;
  if (lastQuery.file) searchFile(lastQuery.file);
  else searchRow(lastQuery.row, lastQuery.item);
}

async function init() {
  try {
    const h = await getJSON(await fetch("/healthz"));
    const ix = h.index;
    maxK = h.max_k || maxK;
    $("k").max = maxK;
    let text = `${ix.count} images, ${ix.dim}-d embeddings, ${ix.kind} index (${ix.exact ? "exact" : "approximate"}`;
    if (!ix.exact) text += ix.recall != null ? `, measured recall ${(100 * ix.recall).toFixed(1)} %` : ", recall not measured";
    text += `)${h.model ? ", model " + h.model : ""}`;
    $("index-info").textContent = text;
  } catch (e) {
    $("index-info").textContent = `cannot reach the service: ${e.message}`;
  }
  $("file").addEventListener("change", (ev) => { if (ev.target.files[0]) searchFile(ev.target.files[0]); });
  $("k").addEventListener("change", again);
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const f = ev.dataTransfer.files[0];
    if (f) searchFile(f);
  });
}

init();
