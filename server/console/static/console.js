// consortia console: the runs list and one run's page, kept live by polling the JSON API.
// Everything the store holds (client ids, reasons) is put in the page as text, never as HTML.
"use strict";

const POLL_RUNNING_MS = 2000;
const POLL_IDLE_MS = 10000;
const SVG = "http://www.w3.org/2000/svg";
let timer = null;
let generation = 0; // a view change makes older polls' results stale

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({credentials: "same-origin"}, options || {}));
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    const err = new Error(`${response.status}: ${detail}`);
    err.status = response.status;
    throw err;
  }
  return response.json();
}

const fmt = {
  num: (v, d = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(d)),
  // ε rounded up, never shown below the one accounted (privacy/display.py epsilon_text).
  eps: (v, d = 3) => {
    if (v === null || v === undefined) return "–";
    const near = Number(v).toFixed(d);
    return Number(near) < v ? (Number(near) + 10 ** -d).toFixed(d) : near;
  },
  time: (t) => (t ? new Date(t * 1000).toLocaleString() : "–"),
  clock: (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–"),
  hash: (h) => (h ? h.slice(0, 12) + "…" : "–"),
};

function badge(text) { return el("span", {class: `badge ${text || ""}`, text: text || "–"}); }

function bar(fraction, cls) {
  const inner = el("div");
  inner.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`;
  return el("div", {class: `bar ${cls || ""}`}, inner);
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const cell of cells) {
      const td = el("td");
      if (cell && cell.num !== undefined) { td.className = "num"; td.textContent = cell.num; }
      else if (cell instanceof Node) td.append(cell);
      else td.textContent = cell === null || cell === undefined ? "–" : String(cell);
      tr.append(td);
    }
    return tr;
  }));
}

// A line chart in inline SVG: rounds on x, the metric on y, a dot per round with a tooltip.
function lineChart(node, points, {label, fixedRange, cls}) {
  const W = 480, H = 220, L = 48, R = 12, T = 12, B = 30;
  node.replaceChildren();
  const usable = points.filter((p) => p.y !== null && p.y !== undefined && isFinite(p.y));
  if (!usable.length) {
    node.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"},
                    "no round recorded yet"));
    return;
  }
  const xs = usable.map((p) => p.x), ys = usable.map((p) => p.y);
  let [y0, y1] = fixedRange || [Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const pad = fixedRange ? 0 : (y1 - y0) * 0.08;
  y0 -= pad; y1 += pad;
  const x0 = Math.min(...xs), x1 = Math.max(Math.max(...xs), x0 + 1);
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    node.append(svg("line", {x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "gridline"}));
    node.append(svg("text", {x: L - 6, y: sy(y) + 4, "text-anchor": "end", class: "tick"},
                    y.toFixed(Math.abs(y1 - y0) < 0.05 ? 4 : 2)));
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 8));
  for (let x = x0; x <= x1; x += step) {
    node.append(svg("text", {x: sx(x), y: H - B + 16, "text-anchor": "middle", class: "tick"}, x));
  }
  node.append(svg("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  node.append(svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  node.append(svg("text", {x: W - R, y: H - 2, "text-anchor": "end", class: "tick"}, "round"));
  const path = usable.map((p, i) => `${i ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`);
  node.append(svg("path", {d: path.join(" "), class: `series ${cls || ""}`}));
  for (const p of usable) {
    const dot = svg("circle", {cx: sx(p.x), cy: sy(p.y), r: 3.5, class: `dot ${cls || ""}`});
    dot.append(svg("title", {}, `round ${p.x}: ${label} ${Number(p.y).toFixed(4)}`));
    node.append(dot);
  }
}

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; return; }
  box.hidden = false;
  box.textContent = err.status === 401
    ? "The console token is missing or was rotated: open the URL printed by `consortia console`."
    : `Could not load: ${err.message}`;
}

function markLive(ok) {
  const live = $("live");
  live.textContent = ok ? `updated ${new Date().toLocaleTimeString()}` : "connection lost, retrying";
  live.classList.toggle("stale", !ok);
}

function schedule(fn, ms) {
  clearTimeout(timer);
  timer = setTimeout(fn, ms);
}

// ---- the runs list ----------------------------------------------------------------------

async function showRuns(gen) {
  $("runs-view").hidden = false;
  $("run-view").hidden = true;
  try {
    const runs = await api("/api/runs");
    if (gen !== generation) return;
    $("runs-empty").hidden = runs.length > 0;
    fill($("runs-table").tBodies[0], runs.map((r) => {
      const link = el("a", {href: `#/runs/${encodeURIComponent(r.run_id)}`}, el("code", {text: r.run_id}));
      const progress = el("div", {class: "epscell"}, bar(r.rounds_completed / r.rounds_total),
                          el("span", {text: `${r.rounds_completed}/${r.rounds_total}`}));
      return [link, r.task, r.kind, badge(r.status), progress, fmt.time(r.created_at),
              fmt.time(r.updated_at)];
    }));
    showError(null);
    markLive(true);
    const anyRunning = runs.some((r) => r.status === "running");
    schedule(() => showRuns(gen), anyRunning ? POLL_RUNNING_MS : POLL_IDLE_MS);
  } catch (err) {
    if (gen !== generation) return;
    showError(err); markLive(false);
    schedule(() => showRuns(gen), POLL_IDLE_MS);
  }
}

// ---- one run ----------------------------------------------------------------------------

function renderRun(run, rounds, clients, checkpoints, audit) {
  $("run-id").textContent = run.run_id;
  const status = $("run-status");
  status.textContent = run.status;
  status.className = `badge ${run.status}`;

  const stopButton = $("stop-button");
  stopButton.hidden = run.status !== "running";
  stopButton.disabled = run.stop_requested_at !== null;
  stopButton.textContent = run.stop_requested_at ? "Stop requested" : "Stop after this round";
  const note = $("stop-note");
  note.hidden = !run.stop_requested_at && run.status !== "lost";
  if (run.status === "lost") {
    note.textContent = `No sign of life from the run's process since ${fmt.clock(run.updated_at)}: ` +
      "it was killed or its machine went down, without recording how the run ended. " +
      "Its last checkpoint is intact: continue it with --resume.";
  } else if (run.stop_requested_at) {
    const asked = `Stop requested by ${run.stop_requested_by} at ${fmt.clock(run.stop_requested_at)}`;
    if (run.status === "running") {
      note.textContent = `${asked}: the server stops after the current round, its checkpoint intact.`;
    } else if (run.status === "stopped") {
      note.textContent = `Stopped on request of ${run.stop_requested_by} after round ${run.rounds_completed}.`;
    } else {  // asked during the last round (it completes), or the run failed before stopping
      note.textContent = `${asked}; the run ${run.status} after round ${run.rounds_completed} ` +
        "before it could stop.";
    }
  }

  const progress = $("progress");
  progress.setAttribute("aria-valuemax", run.rounds_total);
  progress.setAttribute("aria-valuenow", run.rounds_completed);
  progress.firstElementChild.style.width = `${(run.rounds_completed / run.rounds_total) * 100}%`;
  $("progress-label").textContent = `round ${run.rounds_completed} of ${run.rounds_total}`;

  const last = rounds.length ? rounds[rounds.length - 1] : {};
  // Rounds between evaluations (eval_every) carry no accuracy: the tiles show the latest
  // evaluated round's, and say which when it is not the last.
  const scored = rounds.filter((r) => r.accuracy !== null && r.accuracy !== undefined);
  const evaluatedLast = scored.length ? scored[scored.length - 1] : {};
  const of = evaluatedLast.round && evaluatedLast.round !== last.round
    ? ` (round ${evaluatedLast.round})` : "";
  const tiles = [
    [`accuracy${of}`, fmt.num(evaluatedLast.accuracy)], [`loss${of}`, fmt.num(evaluatedLast.loss)],
    ["ε max (clients)", fmt.eps(last.epsilon_max)],
    ["clients trained", last.round ? `${last.clients_trained}/${last.clients_sampled}` : "–"],
    ["task", run.task], ["started", fmt.time(run.created_at)],
  ];
  if (last.user_epsilon !== null && last.user_epsilon !== undefined) {
    tiles.splice(3, 0, ["user-level ε", fmt.eps(last.user_epsilon)]);
  }
  $("tiles").replaceChildren(...tiles.map(([k, v]) => el("div", {class: "tile"}, el("b", {text: v}),
                                                          el("small", {text: k}))));

  // Rounds between evaluations (eval_every) carry no accuracy: plot the evaluated ones.
  const evaluated = rounds.filter((r) => r.accuracy !== null && r.accuracy !== undefined);
  lineChart($("accuracy-chart"), evaluated.map((r) => ({x: r.round, y: r.accuracy})),
            {label: "accuracy", fixedRange: [0, 1]});
  lineChart($("loss-chart"), evaluated.map((r) => ({x: r.round, y: r.loss})),
            {label: "loss", cls: "loss"});

  fill($("client-table").tBodies[0], clients.map((c) => {
    let eps = "not reported";
    if (c.epsilon !== null) {
      const share = c.epsilon_budget ? c.epsilon / c.epsilon_budget : 0;
      const cls = share > 1 ? "eps over" : share > 0.85 ? "eps high" : "eps";
      eps = el("div", {class: "epscell"}, bar(share, cls),
               el("span", {text: `${fmt.eps(c.epsilon)} / ${fmt.num(c.epsilon_budget, 2)}` +
                                 // The δ of this ε: the client's own (a partner sets it).
                                 (c.delta === null || c.delta === undefined ? "" : ` at δ ${c.delta}`)}));
      if (c.epsilon_if_secagg_fails !== null && c.epsilon_if_secagg_fails !== undefined) {
        // Distributed DP: the second guarantee, from the client's own noise shares alone.
        eps.append(el("span", {class: "eps-fallback",
                               text: `if secure aggregation fails: ${fmt.eps(c.epsilon_if_secagg_fails)}`}));
      }
    }
    return [c.client_id, badge(c.status), c.reason || "", {num: c.rounds_joined},
            `round ${c.last_seen_round} · ${fmt.clock(c.last_seen_at)}`, eps];
  }));

  fill($("round-table").tBodies[0], rounds.slice().reverse().map((r) => [
    {num: r.round}, {num: fmt.num(r.accuracy)}, {num: fmt.num(r.loss)}, {num: r.clients_trained},
    {num: r.clients_refused}, {num: r.clients_rejected}, {num: r.clients_failed},
    {num: fmt.eps(r.epsilon_max)}, {num: r.duration_s === null ? "–" : `${r.duration_s.toFixed(1)} s`},
  ]));

  const secagg = rounds.filter((r) => r.secagg_status);
  $("secagg-off").hidden = secagg.length > 0 || rounds.length === 0;
  $("secagg-table").hidden = secagg.length === 0;
  fill($("secagg-table").tBodies[0], secagg.slice().reverse().map((r) => [
    {num: r.round}, badge(r.secagg_status), {num: r.secagg_participants ?? "–"},
    {num: r.secagg_dropped ?? 0}, r.secagg_reason || "",
  ]));

  fill($("checkpoint-table").tBodies[0], checkpoints.slice().reverse().map((c) => {
    const hash = el("code", {text: fmt.hash(c.sha256), title: c.sha256});
    const parent = el("code", {text: c.parent_sha256 ? fmt.hash(c.parent_sha256) : "(initial model)",
                               title: c.parent_sha256 || ""});
    const link = c.available
      ? el("a", {href: `/api/runs/${encodeURIComponent(run.run_id)}/checkpoints/${c.round}/weights`,
                 download: ""}, "download")
      : el("span", {class: "muted", text: "not on this machine"});
    return [{num: c.round}, hash, parent, fmt.time(c.created_at), link];
  }));

  fill($("audit-table").tBodies[0], audit.map((e) => [
    fmt.time(e.at), e.kind, e.actor, e.event, e.round ?? "", e.detail,
  ]));
}

async function showRun(runId, gen) {
  $("runs-view").hidden = true;
  $("run-view").hidden = false;
  const base = `/api/runs/${encodeURIComponent(runId)}`;
  try {
    const [run, rounds, clients, checkpoints, audit] = await Promise.all([
      api(base), api(`${base}/rounds`), api(`${base}/clients`), api(`${base}/checkpoints`),
      api(`${base}/audit`),
    ]);
    if (gen !== generation) return;
    renderRun(run, rounds, clients, checkpoints, audit);
    showError(null);
    markLive(true);
    schedule(() => showRun(runId, gen), run.status === "running" ? POLL_RUNNING_MS : POLL_IDLE_MS);
  } catch (err) {
    if (gen !== generation) return;
    showError(err); markLive(false);
    if (err.status !== 404) schedule(() => showRun(runId, gen), POLL_IDLE_MS);
  }
}

async function requestStop() {
  const runId = $("run-id").textContent;
  const button = $("stop-button");
  button.disabled = true;
  try {
    await api(`/api/runs/${encodeURIComponent(runId)}/stop`,
              {method: "POST", headers: {"X-Consortia-Request": "1"}});
    route();
  } catch (err) {
    showError(err);
    button.disabled = false;
  }
}

function route() {
  generation += 1;
  clearTimeout(timer);
  const match = location.hash.match(/^#\/runs\/([^/]+)$/);
  if (match) {
    let runId = match[1];
    try { runId = decodeURIComponent(runId); } catch (e) { /* not %-encoded: the id as typed */ }
    showRun(runId, generation);
  } else showRuns(generation);
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  $("stop-button").addEventListener("click", requestStop);
  route();
});
