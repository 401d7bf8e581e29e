// The dashboard's page: fetches the JSON endpoints of emulator/dashboard.py and draws SVG charts.
// No library and nothing from the network. Every drawn point carries its values in data-*
// attributes (data-ts, data-value, ...), so the charts can be read back (tests do).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = Number(new URLSearchParams(location.search).get("refresh") || 15) * 1000;
const state = { sites: [], site: null, building: "", thing: "" };

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  if (parent) parent.appendChild(node);
  return node;
}

function text(parent, x, y, s, attrs) {
  const t = el("text", Object.assign({ x, y }, attrs || {}), parent);
  t.textContent = s;
  return t;
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function pad(n) { return String(n).padStart(2, "0"); }
function timeLabel(ms, step) {
  const d = new Date(ms);
  const day = `${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
  return step >= 86400000 ? day : `${day} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
}
function fmt(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  if (Number.isInteger(v)) return String(v);
  return a >= 1000 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
}
function niceTicks(lo, hi, n) {
  if (hi <= lo) hi = lo + 1;
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
  const out = [], top = Math.ceil(hi / step - 1e-9) * step;
  for (let v = Math.floor(lo / step) * step; v <= top + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

// A time-series chart. spec: {title, kind, attrs, series: [{name, cls, points: [[x, y, extra]]}],
// markers: [{x, y, r, attrs}], switches: [{ts, from, to}], band: [{model, first_ts, last_ts}]}
function chart(parent, spec) {
  const W = spec.width || 1000, H = spec.height || 240, L = 62, R = 16, T = 24, B = spec.band ? 52 : 30;
  const svg = el("svg", Object.assign({ class: "chart", viewBox: `0 0 ${W} ${H}`, "data-chart": spec.kind },
    spec.attrs || {}), parent);
  text(svg, L, 16, spec.title, { class: "title" });
  const xs = [], ys = [0];
  for (const s of spec.series) for (const p of s.points) { xs.push(p[0]); if (p[1] !== null) ys.push(p[1]); }
  for (const m of spec.switches || []) xs.push(m.ts);
  if (!xs.length) {
    text(svg, W / 2, H / 2, "no data yet", { class: "empty", "text-anchor": "middle" });
    return svg;
  }
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 === x0) { x0 -= 1800000; x1 += 1800000; }
  const ticks = niceTicks(0, Math.max(...ys), 4);
  const y1 = ticks[ticks.length - 1];
  const X = v => L + (v - x0) / (x1 - x0) * (W - L - R);
  const Y = v => H - B - (v / y1) * (H - B - T);
  const grid = el("g", { class: "grid axis" }, svg);
  for (const t of ticks) {
    el("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t) }, grid);
    text(grid, L - 6, Y(t) + 4, fmt(t), { "text-anchor": "end", class: "tick" });
  }
  const step = (x1 - x0) > 3 * 86400000 ? 86400000 : 3600000;
  const n = W >= 800 ? 5 : 3;
  for (let i = 0; i <= n; i++) {
    const v = x0 + (x1 - x0) * i / n;
    text(grid, X(v), H - B + 16, timeLabel(v, step), { "text-anchor": i === 0 ? "start" : i === n ? "end" : "middle", class: "tick" });
  }
  for (const s of spec.series) {
    const g = el("g", { class: `series ${s.cls}`, "data-series": s.name }, svg);
    const pts = s.points.filter(p => p[1] !== null);
    el("polyline", { points: pts.map(p => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ") }, g);
    for (const p of pts) {
      const c = el("circle", Object.assign({ class: "pt", cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 2,
        "data-series": s.name, "data-ts": p[0], "data-value": p[1] }, p[2] || {}), g);
      el("title", {}, c).textContent = `${s.name} ${timeLabel(p[0], 60000)} UTC: ${fmt(p[1])}`;
    }
  }
  for (const m of spec.markers || []) {
    const c = el("circle", Object.assign({ class: "anomaly", cx: X(m.x).toFixed(1), cy: Y(m.y).toFixed(1), r: m.r }, m.attrs), svg);
    el("title", {}, c).textContent = m.title;
  }
  for (const sw of spec.switches || []) {
    const x = X(sw.ts);
    el("line", { class: "model-switch", x1: x, x2: x, y1: T, y2: H - B, "data-ts": sw.ts, "data-from": sw.from, "data-to": sw.to }, svg);
    text(svg, Math.min(x + 4, W - R - 4), T + 10, `model → ${sw.to}`, { class: "switch-label", "text-anchor": x > W * 0.8 ? "end" : "start" });
  }
  if (spec.band) {
    const colors = ["#4c78a8", "#9467bd", "#54a24b", "#e45756", "#72b7b2", "#b279a2"];
    const band = el("g", { class: "model-band" }, svg);
    spec.band.forEach((seg, i) => {
      const next = spec.band[i + 1];
      const a = X(seg.first_ts), b = next ? X(next.first_ts) : X(x1);
      const r = el("rect", { x: a, y: H - 22, width: Math.max(2, b - a), height: 16, fill: colors[i % colors.length],
        "data-model": seg.model, "data-first-ts": seg.first_ts, "data-last-ts": seg.last_ts }, band);
      el("title", {}, r).textContent = `model ${seg.model}`;
      if (b - a > 60) text(band, a + 4, H - 10, seg.model.length > 40 ? seg.model.slice(0, 38) + "…" : seg.model);
    });
  }
  return svg;
}

// ------------------------------------------------------------------ consumption

function fillSelect(select, options, value) {
  select.innerHTML = "";
  for (const [v, label] of options) {
    const o = document.createElement("option");
    o.value = v; o.textContent = label;
    select.appendChild(o);
  }
  if (options.some(([v]) => v === value)) select.value = value;
  return select.value;
}

function currentSite() { return state.sites.find(s => s.site === state.site); }

function pickers() {
  state.site = fillSelect(document.getElementById("site"), state.sites.map(s => [s.site, `site ${s.site}`]), state.site);
  const site = currentSite();
  const blds = site ? site.buildings : [];
  const opts = [["", `all ${blds.length} buildings`]].concat(blds.map(b => [b.building,
    `building ${b.building}` + (b.flagged ? ` (${b.flagged} flagged)` : "")]));
  state.building = fillSelect(document.getElementById("building"), opts, state.building);
}

function gatewaysOfSelection() {
  const site = currentSite();
  if (!site) return [];
  const blds = state.building ? site.buildings.filter(b => b.building === state.building) : site.buildings;
  return [...new Set(blds.flatMap(b => b.things))].sort();
}

async function loadConsumption() {
  if (!state.site) return;
  const key = `${state.site}/${state.building}`;
  const data = await getJSON(`/api/consumption?site=${encodeURIComponent(state.site)}&building=${encodeURIComponent(state.building)}`);
  state.meta = data;
  const box = document.getElementById("consumption");
  box.innerHTML = "";
  document.getElementById("consumption-title").textContent =
    `site ${data.site}, ${data.building ? "building " + data.building : "all buildings"}`;
  document.getElementById("bucket-name").textContent = data.bucket_ms >= 86400000 ? "day" : "hour";
  for (const s of data.series) {
    const actual = s.points.map(p => [p[0], p[1], { "data-readings": p[3], "data-flagged": p[4] }]);
    const expected = s.points.map(p => [p[0], p[2]]);
    const markers = s.points.filter(p => p[4] > 0).map(p => ({
      x: p[0], y: p[1], r: 4 + Math.min(6, Math.log2(1 + p[4])),
      attrs: { "data-ts": p[0], "data-value": p[1], "data-expected": p[2], "data-flagged": p[4], "data-max-score": p[5] },
      title: `${p[4]} flagged reading(s) in ${timeLabel(p[0], data.bucket_ms)} UTC: actual ${fmt(p[1])}, expected ${fmt(p[2])} kWh, max score ${fmt(p[5])}`,
    }));
    chart(box, {
      kind: "consumption", title: `${s.meter_type} (kWh)` + (s.models.length ? ` · scored by ${s.models.map(m => m.model).join(", ")}` : ""),
      attrs: { "data-site": data.site, "data-building": data.building, "data-meter-type": s.meter_type, "data-bucket-ms": data.bucket_ms },
      series: [{ name: "actual", cls: "actual", points: actual }, { name: "expected", cls: "expected", points: expected }],
      markers, switches: s.switches,
    });
  }
  if (!data.series.length) box.textContent = "no readings for this selection yet";
  document.body.dataset.consumptionReady = key;
}

// ------------------------------------------------------------------ health

const HEALTH_CHARTS = [
  { title: "buffer depth (readings pending)", fields: [["pending", "actual"]] },
  { title: "lag: oldest unsent reading's age (s)", fields: [["lag_s", "actual"]] },
  { title: "rates (readings per hour): ingest (blue), delivered (green)", fields: [["ingest_per_h", "actual"], ["delivered_per_h", "second"]] },
  { title: "autonomy (hours the free buffer lasts)", fields: [["autonomy_hours", "actual"]], band: true },
];
const TILES = [["pending", "pending"], ["lag_s", "lag (s)"], ["ingest_per_h", "ingest /h"],
  ["delivered_per_h", "delivered /h"], ["autonomy_hours", "autonomy (h)"], ["model", "model"], ["connected", "connected"]];

async function loadHealth() {
  const wanted = state.thing || gatewaysOfSelection()[0] || "";
  const data = await getJSON(`/api/health?thing=${encodeURIComponent(wanted)}`);
  state.thing = fillSelect(document.getElementById("thing"), data.things.map(t => [t, t]), data.thing);
  const tiles = document.getElementById("health-latest");
  tiles.innerHTML = "";
  const latest = data.latest[data.thing] || {};
  for (const [field, label] of TILES) {
    const v = latest[field];
    const div = document.createElement("div");
    div.className = "tile";
    div.dataset.field = field;
    div.dataset.value = v === undefined || v === null ? "" : String(v);
    div.innerHTML = `<div class="label"></div><div class="value"></div>`;
    div.querySelector(".label").textContent = label;
    div.querySelector(".value").textContent = typeof v === "number" ? fmt(v) : v === undefined || v === null ? "–" : String(v);
    tiles.appendChild(div);
  }
  const box = document.getElementById("health");
  box.innerHTML = "";
  for (const c of HEALTH_CHARTS) {
    chart(box, {
      kind: "health", title: c.title, width: 540, height: c.band ? 230 : 200,
      attrs: { "data-thing": data.thing, "data-fields": c.fields.map(f => f[0]).join(",") },
      series: c.fields.map(([f, cls]) => ({ name: f, cls, points: data.points.map(p => [p.ts, p[f]]) })),
      switches: data.switches, band: c.band ? data.models : null,
    });
  }
  document.body.dataset.healthReady = data.thing;
}

// ------------------------------------------------------------------ wiring

function status(msg, bad) {
  const s = document.getElementById("status");
  s.textContent = msg;
  s.className = bad ? "status error" : "status";
}

async function refresh(all) {
  try {
    if (all) {
      const b = await getJSON("/api/buildings");
      state.sites = b.sites;
      if (!state.site && b.sites.length) state.site = b.sites[0].site;
      pickers();
    }
    await Promise.all([loadConsumption(), loadHealth()]);
    const m = state.meta || {};
    status(`readings as of ${new Date(m.as_of_ms || Date.now()).toISOString().slice(11, 19)} UTC` +
      ` (query ${Math.round(m.query_ms || 0)} ms)` + (m.refreshing ? ", refreshing…" : "") +
      (m.error ? ` · last refresh failed: ${m.error}` : ""), !!m.error);
  } catch (e) {
    status(`error: ${e.message}`, true);
  }
}

document.getElementById("site").addEventListener("change", e => {
  state.site = e.target.value; state.building = ""; state.thing = ""; pickers(); refresh(false);
});
document.getElementById("building").addEventListener("change", e => {
  state.building = e.target.value; state.thing = ""; refresh(false);
});
document.getElementById("thing").addEventListener("change", e => { state.thing = e.target.value; loadHealth(); });
refresh(true);
setInterval(() => refresh(true), REFRESH_MS);
