// The dashboard's page: fetches the JSON endpoints of emulator/dashboard.py and draws SVG charts.
// No library and nothing from the network. Every drawn point carries its values in data-*
// attributes (data-ts, data-value, ...), so the charts can be read back (tests do). The consumption
// charts show one time range (the buttons in #range, from /api/consumption's "ranges"); a range of
// several periods is drawn side by side, each gap collapsed into an axis break (g.axis-break).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = Number(new URLSearchParams(location.search).get("refresh") || 15) * 1000;
// range: the id the user clicked ("" until then: the server's default, the busiest period)
const state = { sites: [], site: null, building: "", thing: "", range: "", seq: 0 };
const DAY_MS = 86400000, BREAK_PX = 26;

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
function timeLabel(ms, step, withYear) {
  const d = new Date(ms);
  const day = (withYear ? `${d.getUTCFullYear()}-` : "") + `${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
  return step >= DAY_MS ? day : `${day} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
}
function gapLabel(ms) {
  const days = ms / DAY_MS;
  return days >= 730 ? `${(days / 365.25).toFixed(1)} years` : `${Math.round(days)} days`;
}

// The x scale over segments [[from, to], ...] laid side by side, BREAK_PX between them; each
// gets width for its span, but at least a tenth of the whole, so a few minutes stay visible.
function xScale(segments, left, width) {
  const multi = segments.length > 1;
  const segs = segments.map(([a, b]) => (b > a ? [a, b] : multi ? [a, b] : [a - 1800000, b + 1800000]));
  const free = width - BREAK_PX * (segs.length - 1);
  const total = segs.reduce((t, [a, b]) => t + (b - a), 0) || 1;
  const weights = segs.map(([a, b]) => Math.max(b - a, multi ? total / 10 : 0));
  const wsum = weights.reduce((t, w) => t + w, 0) || 1;
  let at = left;
  const laid = segs.map(([a, b], i) => {
    const px = free * weights[i] / wsum, pad = multi ? Math.min(8, px / 4) : 0;
    const seg = { a, b, x: at, px, lo: at + pad, hi: at + px - pad };
    at += px + BREAK_PX;
    return seg;
  });
  const X = v => {
    const s = laid.find(s => v <= s.b) || laid[laid.length - 1];
    if (s.b === s.a) return (s.lo + s.hi) / 2;
    return s.lo + (Math.min(Math.max(v, s.a), s.b) - s.a) / (s.b - s.a) * (s.hi - s.lo);
  };
  X.segments = laid;
  X.index = v => { const i = laid.findIndex(s => v <= s.b); return i < 0 ? laid.length - 1 : i; };
  return X;
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
// markers: [{x, y, r, attrs}], switches: [{ts, from, to}], band: [{model, first_ts, last_ts}],
// segments: [[from, to], ...] (the x ranges drawn; default: the points' extent), step (bucket ms)}
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
  const segments = spec.segments && spec.segments.length ? spec.segments : [[Math.min(...xs), Math.max(...xs)]];
  const X = xScale(segments, L, W - L - R);
  const x1 = segments[segments.length - 1][1];
  const ticks = niceTicks(0, Math.max(...ys), 4);
  const y1 = ticks[ticks.length - 1];
  const Y = v => H - B - (v / y1) * (H - B - T);
  const grid = el("g", { class: "grid axis" }, svg);
  for (const t of ticks) {
    el("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t) }, grid);
    text(grid, L - 6, Y(t) + 4, fmt(t), { "text-anchor": "end", class: "tick" });
  }
  const multi = X.segments.length > 1;
  X.segments.forEach((s, k) => {
    const step = spec.step || ((s.b - s.a) > 3 * DAY_MS ? DAY_MS : 3600000);
    const withYear = !!spec.step && (step >= DAY_MS || multi);
    const room = withYear ? (step >= DAY_MS ? 80 : 120) : 90;
    const n = Math.min(W >= 800 ? 5 : 3, Math.floor(s.px / room));
    if (n < 1 || s.b === s.a) {
      text(grid, (s.lo + s.hi) / 2, H - B + 16, timeLabel(s.a, step, withYear), { "text-anchor": "middle", class: "tick" });
      return;
    }
    for (let i = 0; i <= n; i++) {
      const v = s.a + (s.b - s.a) * i / n;
      text(grid, s.lo + (s.hi - s.lo) * i / n, H - B + 16, timeLabel(v, step, withYear),
        { "text-anchor": i === 0 ? "start" : i === n ? "end" : "middle", class: "tick" });
    }
  });
  for (const [k, s] of X.segments.entries()) {
    if (k === 0) continue;
    // the collapsed gap: a shaded strip between the periods, zigzags on the axis, its length
    const prev = X.segments[k - 1], a = prev.x + prev.px, mid = a + BREAK_PX / 2;
    const g = el("g", { class: "axis-break", "data-from-ts": segments[k - 1][1], "data-to-ts": segments[k][0] }, svg);
    el("rect", { x: a + 3, y: T, width: BREAK_PX - 6, height: H - B - T }, g);
    for (const dx of [-4, 4]) {
      el("path", { d: `M${mid + dx - 4},${H - B + 5} L${mid + dx + 4},${H - B - 5}` }, g);
    }
    text(g, mid, T - 3, gapLabel(segments[k][0] - segments[k - 1][1]), { "text-anchor": "middle", class: "break-label" });
    el("title", {}, g).textContent = `no readings for ${gapLabel(segments[k][0] - segments[k - 1][1])}: ` +
      `${timeLabel(segments[k - 1][1], 60000, true)} to ${timeLabel(segments[k][0], 60000, true)} UTC (collapsed)`;
  }
  for (const s of spec.series) {
    const g = el("g", { class: `series ${s.cls}`, "data-series": s.name }, svg);
    const pts = s.points.filter(p => p[1] !== null);
    // one line per segment: none drawn across a break
    const lines = X.segments.map(() => []);
    for (const p of pts) lines[X.index(p[0])].push(p);
    for (const line of lines) {
      if (line.length) el("polyline", { points: line.map(p => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ") }, g);
    }
    for (const p of pts) {
      const c = el("circle", Object.assign({ class: "pt", cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 2,
        "data-series": s.name, "data-ts": p[0], "data-value": p[1] }, p[2] || {}), g);
      el("title", {}, c).textContent = `${s.name} ${timeLabel(p[0], 60000, true)} UTC: ${fmt(p[1])}`;
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

function rangeButtons(data) {
  const box = document.getElementById("range");
  box.innerHTML = "";
  for (const r of data.ranges) {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.range = r.id;
    b.dataset.fromMs = r.from_ms;
    b.dataset.toMs = r.to_ms;
    b.dataset.readings = r.readings;
    b.textContent = r.label;
    b.title = `${r.readings.toLocaleString("en")} readings, ${timeLabel(r.from_ms, 60000, true)} to ` +
      `${timeLabel(r.to_ms, 60000, true)} UTC`;
    b.setAttribute("aria-pressed", String(r.id === data.range));
    if (r.id === data.range) b.className = "active";
    b.addEventListener("click", () => { state.range = r.id; loadConsumption().catch(e => status(`error: ${e.message}`, true)); });
    box.appendChild(b);
  }
}

async function loadConsumption() {
  if (!state.site) return;
  const key = `${state.site}/${state.building}`;
  const seq = ++state.seq;
  const data = await getJSON(`/api/consumption?site=${encodeURIComponent(state.site)}` +
    `&building=${encodeURIComponent(state.building)}&range=${encodeURIComponent(state.range)}`);
  if (seq !== state.seq) return; // a newer request (another range or building) is under way
  state.meta = data;
  const box = document.getElementById("consumption");
  box.innerHTML = "";
  rangeButtons(data);
  const shown = data.ranges.find(r => r.id === data.range);
  const when = !shown ? "" : shown.id === "all"
    ? `, ${timeLabel(shown.from_ms, DAY_MS, true)} – ${timeLabel(shown.to_ms - 1, DAY_MS, true)}` : `, ${shown.label}`;
  document.getElementById("consumption-title").textContent =
    `site ${data.site}, ${data.building ? "building " + data.building : "all buildings"}${when}`;
  document.getElementById("bucket-name").textContent = data.bucket_ms >= DAY_MS ? "day" : "hour";
  for (const s of data.series) {
    const actual = s.points.map(p => [p[0], p[1], { "data-readings": p[3], "data-flagged": p[4] }]);
    const expected = s.points.map(p => [p[0], p[2]]);
    const markers = s.points.filter(p => p[4] > 0).map(p => ({
      x: p[0], y: p[1], r: 4 + Math.min(6, Math.log2(1 + p[4])),
      attrs: { "data-ts": p[0], "data-value": p[1], "data-expected": p[2], "data-flagged": p[4], "data-max-score": p[5] },
      title: `${p[4]} flagged reading(s) in ${timeLabel(p[0], data.bucket_ms, true)} UTC: actual ${fmt(p[1])}, expected ${fmt(p[2])} kWh, max score ${fmt(p[5])}`,
    }));
    chart(box, {
      kind: "consumption", title: `${s.meter_type} (kWh)` + (s.models.length ? ` · scored by ${s.models.map(m => m.model).join(", ")}` : ""),
      attrs: { "data-site": data.site, "data-building": data.building, "data-meter-type": s.meter_type,
        "data-bucket-ms": data.bucket_ms, "data-range": data.range },
      series: [{ name: "actual", cls: "actual", points: actual }, { name: "expected", cls: "expected", points: expected }],
      markers, switches: s.switches, segments: data.segments, step: data.bucket_ms,
    });
  }
  if (!data.series.length) box.textContent = "no readings for this selection yet";
  document.body.dataset.consumptionRange = data.range;
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
  state.site = e.target.value; state.building = ""; state.thing = ""; state.range = ""; pickers(); refresh(false);
});
document.getElementById("building").addEventListener("change", e => {
  state.building = e.target.value; state.thing = ""; state.range = ""; refresh(false);
});
document.getElementById("thing").addEventListener("change", e => { state.thing = e.target.value; loadHealth(); });
refresh(true);
setInterval(() => refresh(true), REFRESH_MS);
