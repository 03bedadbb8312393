// cxr-deploy review: the page. Plain JavaScript, no dependency, served by the package itself.
// The server pages, sorts and filters; this file only ever holds one page of rows. URLs carry row
// ids, never paths or UIDs; the session token travels in an HTTP-only cookie.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { meta: null, sort: "row", desc: false, offset: 0, limit: 50, total: 0, rows: [],
  current: null, detail: null, zoom: 1, windowTimer: null, metricsTimer: null, metricsAbort: null };

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status}`);
  return body;
}

function filterParams() {
  const form = new FormData($("#filters"));
  const params = new URLSearchParams();
  for (const [k, v] of form.entries()) if (v !== "") params.set(k, v);
  params.set("sort", state.sort);
  if (state.desc) params.set("desc", "1");
  return params;
}

function fmt(p, digits = 3) { return p === "" || p === null || p === undefined ? "" : Number(p).toFixed(digits); }

function reviewText(row) {
  if (!row.review) return "";
  return row.review === "disagree" && row.review_class ? `disagree → ${row.review_class}` : row.review;
}

function shortName(path) {
  // The end of the path (folder and file: what tells films apart); the whole path on hover.
  const parts = path.split("/");
  return parts.length > 2 ? `…/${parts.slice(-2).join("/")}` : path;
}

function cell(tr, text, cls, title) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  if (title) td.title = title;
  tr.appendChild(td);
  return td;
}

async function loadRows() {
  const params = filterParams();
  params.set("offset", state.offset);
  params.set("limit", state.limit);
  const data = await api(`/api/rows?${params}`);
  state.rows = data.rows;
  state.total = data.total;
  const body = $("#rows tbody");
  body.replaceChildren();
  for (const row of data.rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = row.id;
    if (state.current === row.id) tr.classList.add("current");
    cell(tr, row.id + 1, "row-number");
    const name = row.sop_instance_uid ? `${row.path}  (SOP ${row.sop_instance_uid})` : row.path;
    cell(tr, shortName(row.path), "image", name);
    cell(tr, row.status, `status status-${row.status}`, row.error || "");
    cell(tr, fmt(row.probability, 4), "probability", row.probability);
    cell(tr, row.predicted_label, "decision");
    cell(tr, row.threshold === "" ? "" : Number(row.threshold).toString(), "threshold");
    cell(tr, row.operating_point, "point");
    cell(tr, row.label, "label" + (row.label && row.predicted_label && row.label !== row.predicted_label ? " mismatch" : ""));
    cell(tr, reviewText(row), `review review-${row.review}`);
    if (state.meta.population) cell(tr, row.outside ? "outside" : (row.in_population ? "in" : ""), row.outside ? "outside" : "");
    tr.addEventListener("click", () => openRow(row.id));
    body.appendChild(tr);
  }
  const last = Math.min(state.offset + state.limit, state.total);
  $("#page-info").textContent = state.total ? `rows ${state.offset + 1}–${last} of ${state.total}` : "no rows match";
  $("#prev-page").disabled = state.offset === 0;
  $("#next-page").disabled = last >= state.total;
  for (const th of document.querySelectorAll("#rows th[data-sort]")) {
    th.classList.toggle("sorted-asc", th.dataset.sort === state.sort && !state.desc);
    th.classList.toggle("sorted-desc", th.dataset.sort === state.sort && state.desc);
  }
  document.body.dataset.rowsLoaded = String(Number(document.body.dataset.rowsLoaded || 0) + 1);
}

function markCurrent() {
  for (const tr of document.querySelectorAll("#rows tbody tr")) tr.classList.toggle("current", Number(tr.dataset.id) === state.current);
}

async function openRow(id) {
  state.current = id;
  markCurrent();
  const detail = await api(`/api/row/${id}`);
  if (state.current !== id) return;  // another row was asked for meanwhile
  state.detail = detail;
  $("#viewer").hidden = false;
  $("#viewer").dataset.row = id;
  const bits = [`#${id + 1}`, detail.path];
  if (detail.sop_instance_uid) bits.push(`SOP ${detail.sop_instance_uid}`);
  bits.push(detail.status + (detail.error ? ` (${detail.error})` : ""));
  if (detail.probability !== "") bits.push(`p = ${detail.probability}`, `${detail.predicted_label} at ${detail.threshold} (${detail.operating_point || "threshold"})`);
  if (detail.label) bits.push(`label ${detail.label}`);
  if (detail.outside) bits.push("OUTSIDE the model's population");
  $("#row-info").textContent = bits.join(" · ");
  const original = $("#original");
  original.src = detail.status === "skipped" ? "" : `/image/${id}`;
  const overlay = $("#overlay");
  overlay.dataset.row = id;
  if (detail.overlay.ok) {
    overlay.src = `/overlay/${id}`;
    overlay.hidden = false;
    $("#caption").textContent = detail.overlay.caption || "Grad-CAM overlay";
  } else {
    overlay.removeAttribute("src");
    overlay.hidden = true;
    $("#caption").textContent = detail.overlay.reason || "no overlay";
  }
  setupWindow(detail.window);
  showVerdict(detail.verdict);
  $("#comment").value = "";
  const pos = await api(`/api/row/${id}/neighbour?${filterParams()}&dir=none`).catch(() => null);
  if (pos && pos.position !== null && pos.id === id) $("#position").textContent = `${pos.position + 1} of ${pos.total}`;
  else $("#position").textContent = "";
}

function showVerdict(verdict) {
  for (const b of document.querySelectorAll("button.verdict")) b.classList.toggle("active", !!verdict && b.dataset.verdict === verdict.verdict);
  const select = $("#correct-class");
  const others = state.meta.class_names.filter((c) => !state.detail || c !== state.detail.predicted_label);
  select.replaceChildren(...others.map((c) => new Option(c, c)));
  select.hidden = others.length < 2;
  if (verdict && verdict.correct_class) select.value = verdict.correct_class;
  $("#verdict-state").textContent = verdict
    ? `saved: ${verdict.verdict}${verdict.correct_class ? " → " + verdict.correct_class : ""}${verdict.reviewer ? " by " + verdict.reviewer : ""} ${verdict.reviewed_at}`
    : (state.detail && state.detail.status !== "ok" ? "only scored rows can be reviewed" : "not reviewed");
  $("#verdict-box").dataset.verdict = verdict ? verdict.verdict : "";
}

async function saveVerdict(verdict) {
  const d = state.detail;
  if (!d || d.status !== "ok") return;
  const others = state.meta.class_names.filter((c) => c !== d.predicted_label);
  const correct = verdict === "disagree" ? (others.length === 1 ? others[0] : $("#correct-class").value) : "";
  const reviewer = $("#reviewer").value.trim();
  localStorage.setItem("cxr-review-reviewer", reviewer);
  $("#verdict-state").textContent = "saving…";
  try {
    await api(`/api/row/${d.id}/verdict`, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ verdict, correct_class: correct, comment: $("#comment").value, reviewer }) });
  } catch (err) {
    $("#verdict-state").textContent = `not saved: ${err.message}`;
    return;
  }
  const detail = await api(`/api/row/${d.id}`);
  if (state.current === d.id) { state.detail = detail; showVerdict(detail.verdict); }
  await loadRows();
  scheduleMetrics();
}

async function step(direction) {
  if (state.current === null) {
    if (state.rows.length) openRow(state.rows[0].id);
    return;
  }
  const pos = await api(`/api/row/${state.current}/neighbour?${filterParams()}&dir=${direction}`);
  if (pos.id === null || pos.id === state.current) return;
  const page = Math.floor(pos.position / state.limit) * state.limit;
  if (page !== state.offset) { state.offset = page; await loadRows(); }
  await openRow(pos.id);
}

// -- window / level (grayscale DICOM) and zoom ---------------------------------------------------
function setupWindow(win) {
  const box = $("#window-controls");
  box.hidden = !win;
  if (!win) return;
  const span = Math.max(win.max - win.min, 1);
  const wc = $("#wc"), ww = $("#ww");
  wc.min = win.min - span / 2; wc.max = win.max + span / 2; wc.value = win.center;
  ww.min = 1; ww.max = span * 2; ww.value = win.width;
  box.dataset.center = win.center; box.dataset.width = win.width;
  showWindow();
}

function showWindow() {
  $("#wc-value").textContent = Number($("#wc").value).toFixed(0);
  $("#ww-value").textContent = Number($("#ww").value).toFixed(0);
}

function windowChanged() {
  showWindow();
  clearTimeout(state.windowTimer);
  state.windowTimer = setTimeout(() => {
    if (state.current === null) return;
    $("#original").src = `/image/${state.current}?wc=${$("#wc").value}&ww=${$("#ww").value}`;
  }, 120);
}

function setZoom(zoom) {
  state.zoom = Math.min(8, Math.max(1, zoom));
  for (const frame of document.querySelectorAll(".frame")) {
    frame.classList.toggle("zoomed", state.zoom > 1);
    const img = frame.querySelector("img");
    img.style.width = state.zoom > 1 ? `${state.zoom * frame.clientWidth}px` : "";
  }
  $("#zoom-level").textContent = `${Math.round(state.zoom * 100)}%`;
}

function syncScroll(source) {
  for (const frame of document.querySelectorAll(".frame")) {
    if (frame !== source) { frame.scrollLeft = source.scrollLeft; frame.scrollTop = source.scrollTop; }
  }
}

// -- operating point -----------------------------------------------------------------------------
function setupOperatingPoint() {
  const meta = state.meta;
  const select = $("#truth-source");
  select.replaceChildren(...meta.truth_sources.map((s) => new Option(s === "labels" ? `labels (${meta.labels})` : "review verdicts", s)));
  $("#op").hidden = false;
  addMarks();
  const start = meta.points.find((p) => p.from === "results") || meta.points[0];
  setThreshold(start ? start.threshold : 0.5);
}

function addMarks() {
  const marks = $("#marks"), list = $("#named-points");
  marks.replaceChildren();
  list.replaceChildren();
  for (const point of state.meta.points) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "mark";
    b.dataset.threshold = point.threshold;
    b.textContent = `${point.name} ${Number(point.threshold).toFixed(3)}`;
    b.title = `${point.name}: threshold ${point.threshold} (${point.from === "bundle" ? "named in the bundle" : "used by the results"})`;
    b.addEventListener("click", () => setThreshold(point.threshold));
    marks.appendChild(b);
    list.appendChild(new Option(point.name, point.threshold));
  }
}

function setThreshold(value) {
  $("#threshold").value = value;
  $("#threshold-value").value = value;
  scheduleMetrics(0);
}

function scheduleMetrics(delay = 40) {
  if ($("#op").hidden) return;
  clearTimeout(state.metricsTimer);
  state.metricsTimer = setTimeout(loadMetrics, delay);
}

async function loadMetrics() {
  if (state.metricsAbort) state.metricsAbort.abort();
  state.metricsAbort = new AbortController();
  const threshold = $("#threshold-value").value;
  const params = new URLSearchParams({ threshold, source: $("#truth-source").value || "labels" });
  let m;
  try {
    m = await api(`/api/metrics?${params}`, { signal: state.metricsAbort.signal });
  } catch (err) {
    if (err.name !== "AbortError") $("#op-note").textContent = err.message;
    return;
  }
  const ci = (c) => (c ? `95% CI ${c[0].toFixed(3)}–${c[1].toFixed(3)}` : "");
  $("#sens").textContent = m.sensitivity === null ? "—" : m.sensitivity.toFixed(3);
  $("#spec").textContent = m.specificity === null ? "—" : m.specificity.toFixed(3);
  $("#sens-ci").textContent = ci(m.sensitivity_ci);
  $("#spec-ci").textContent = ci(m.specificity_ci);
  for (const k of ["tp", "fn", "fp", "tn"]) $(`#${k}`).textContent = m.confusion[k];
  const models = state.meta.models || [];
  $("#op-note").textContent = (m.n
    ? `${m.n} scored rows with a truth (${m.source}); called positive when p ≥ ${m.threshold}; Wilson 95% intervals`
    : `no scored row has a truth from ${m.source} yet`)
    + (models.length > 1 ? ` · WARNING: the rows come from ${models.length} models (${models.join(", ")}): one threshold over pooled scores` : "");
  $("#op").dataset.threshold = m.threshold;
}

// -- wiring --------------------------------------------------------------------------------------
function typing(event) {
  const t = event.target;
  return t && (t.tagName === "INPUT" && t.type !== "range" && t.type !== "checkbox" || t.tagName === "TEXTAREA" || t.tagName === "SELECT");
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey || typing(event)) return;
  const actions = { j: () => step("next"), ArrowRight: () => step("next"), k: () => step("prev"),
    ArrowLeft: () => step("prev"), a: () => saveVerdict("agree"), d: () => saveVerdict("disagree"),
    u: () => saveVerdict("unsure"), "+": () => setZoom(state.zoom * 1.5), "=": () => setZoom(state.zoom * 1.5),
    "-": () => setZoom(state.zoom / 1.5), "0": () => setZoom(1),
    Escape: () => { $("#viewer").hidden = true; state.current = null; markCurrent(); } };
  const action = actions[event.key];
  if (action) { event.preventDefault(); action(); }
}

function showSummary() {
  const meta = state.meta, loading = meta.loading;
  const rows = loading.done ? `${meta.rows} rows` : `reading… ${meta.rows} rows so far`;
  $("#summary").textContent = `${rows} · ${meta.sources.join(", ")} · verdicts → ${meta.reviews}`
    + (meta.model ? ` · ${meta.model}` : "") + (loading.error ? ` · STOPPED READING: ${loading.error}` : "");
  document.body.dataset.loaded = loading.done ? "1" : "0";
}

async function followLoading() {
  // A large file is read while the page is already up: refresh the counts until it is complete.
  while (!state.meta.loading.done) {
    await new Promise((resolve) => setTimeout(resolve, 400));
    const meta = await api("/api/meta");
    state.meta.rows = meta.rows;
    state.meta.loading = meta.loading;
    state.meta.points = meta.points;
    state.meta.models = meta.models;
    showSummary();
    await loadRows();
  }
  addMarks();
}

async function start() {
  state.meta = await api("/api/meta");
  const meta = state.meta;
  showSummary();
  const decision = $("#filters select[name=decision]");
  for (const c of meta.class_names) decision.appendChild(new Option(c, c));
  if (meta.population) {
    $("#outside-filter").hidden = false;
    document.querySelector("#rows th.population").hidden = false;
  }
  $("#reviewer").value = localStorage.getItem("cxr-review-reviewer") || "";
  for (const th of document.querySelectorAll("#rows th[data-sort]")) {
    th.addEventListener("click", () => {
      state.desc = state.sort === th.dataset.sort ? !state.desc : false;
      state.sort = th.dataset.sort;
      state.offset = 0;
      loadRows();
    });
  }
  $("#filters").addEventListener("change", () => { state.offset = 0; loadRows(); });
  $("#filters").addEventListener("submit", (e) => e.preventDefault());
  $("#filters").addEventListener("reset", () => setTimeout(() => { state.offset = 0; loadRows(); }, 0));
  $("#prev-page").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); loadRows(); });
  $("#next-page").addEventListener("click", () => { state.offset += state.limit; loadRows(); });
  $("#prev-row").addEventListener("click", () => step("prev"));
  $("#next-row").addEventListener("click", () => step("next"));
  $("#close-viewer").addEventListener("click", () => onKey({ key: "Escape", preventDefault() {} }));
  $("#zoom-in").addEventListener("click", () => setZoom(state.zoom * 1.5));
  $("#zoom-out").addEventListener("click", () => setZoom(state.zoom / 1.5));
  $("#zoom-fit").addEventListener("click", () => setZoom(1));
  for (const frame of document.querySelectorAll(".frame")) frame.addEventListener("scroll", () => syncScroll(frame));
  for (const b of document.querySelectorAll("button.verdict")) b.addEventListener("click", () => saveVerdict(b.dataset.verdict));
  $("#wc").addEventListener("input", windowChanged);
  $("#ww").addEventListener("input", windowChanged);
  $("#window-reset").addEventListener("click", () => { if (state.detail) { setupWindow(state.detail.window); $("#original").src = `/image/${state.current}`; } });
  $("#help-button").addEventListener("click", () => { $("#help").hidden = !$("#help").hidden; });
  $("#threshold").addEventListener("input", () => { $("#threshold-value").value = $("#threshold").value; scheduleMetrics(); });
  $("#threshold-value").addEventListener("input", () => { $("#threshold").value = $("#threshold-value").value; scheduleMetrics(); });
  $("#truth-source").addEventListener("change", () => scheduleMetrics(0));
  document.addEventListener("keydown", onKey);
  await loadRows();
  setupOperatingPoint();
  document.body.dataset.ready = "1";
  await followLoading();
  scheduleMetrics(0);
}

document.addEventListener("DOMContentLoaded", () => start().catch((err) => {
  document.body.dataset.error = err.message;
  $("#summary").textContent = `cannot load: ${err.message}`;
}));
