// maskserve's dashboard: plain JavaScript over the service's public HTTP API (the same calls as any client).
"use strict";

const base = location.pathname.replace(/\/ui\/?$/, "");  // behind a proxy's path prefix too
const state = { token: sessionStorage.getItem("maskserve-token") || "", history: {}, timer: null };

function $(id) { return document.getElementById(id); }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, params) {
  const url = new URL(base + path, location.origin);
  for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, v);
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const r = await fetch(url, { headers });
  if (!r.ok) {
    let detail = r.statusText;
    try { const p = await r.json(); detail = p.detail || p.title || detail; } catch (e) { /* not JSON */ }
    throw new Error(r.status === 401 ? "this service needs its bearer token (top right)" : `${r.status}: ${detail}`);
  }
  return r.json();
}

const fmt = new Intl.NumberFormat("en");
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// ---- datasets -------------------------------------------------------------------------------------------

async function loadDatasets() {
  const { datasets } = await api("/v1/datasets");
  const rows = [];
  for (const d of datasets) {
    let caches = "";
    try {
      const { caches: list } = await api(`/v1/datasets/${encodeURIComponent(d.name)}/static-masks`);
      caches = list.map(c => `${c.cache} (K=${c.copies}, ${c.complete ? "complete" : `${c.built}/${c.chunks}`})`).join(", ");
    } catch (e) { caches = "?"; }
    rows.push(el("tr", { "data-dataset": d.name },
      el("td", { text: d.name }), el("td", { text: d.seq_len }), el("td", { text: fmt.format(d.num_sequences) }),
      el("td", { text: fmt.format(d.num_tokens) }), el("td", { text: fmt.format(d.num_documents) }),
      el("td", { text: bytes(d.bytes) }), el("td", { text: caches || "none" })));
  }
  $("dataset-rows").replaceChildren(...rows);
  const select = $("i-dataset");
  const chosen = select.value;
  select.replaceChildren(...datasets.map(d => el("option", { value: d.name, text: d.name })));
  if (chosen) select.value = chosen;
  return datasets;
}

// The ingests running now on any process: what arrived of each body (of its length, when it was announced).
async function loadIngests() {
  const { ingests } = await api("/v1/ingests");
  const rows = ingests.map(g => {
    const elapsed = Math.max(g.updated - g.started, 0.001);
    const received = g.content_length
      ? el("td", {}, el("progress", { max: g.content_length, value: g.bytes_received }),
           ` ${bytes(g.bytes_received)} of ${bytes(g.content_length)}`)
      : el("td", { text: bytes(g.bytes_received) });
    return el("tr", { "data-ingest": g.id, "data-dataset": g.dataset },
      el("td", { text: g.dataset }), received, el("td", { text: fmt.format(g.documents) }),
      el("td", { text: fmt.format(g.tokens) }), el("td", { text: bytes(g.bytes_staged) }),
      el("td", { text: `${bytes(g.bytes_received / elapsed)}/s` }), el("td", { text: `${elapsed.toFixed(0)} s` }),
      el("td", { text: g.key || "" }));
  });
  $("ingest-rows").replaceChildren(...rows);
  $("ingests").hidden = !rows.length;
  $("no-ingests").hidden = !!rows.length;
}

async function loadDatasetsPage() {
  await Promise.all([loadDatasets(), loadIngests()]);
}

// ---- jobs -----------------------------------------------------------------------------------------------

function ackedSequences(p) {
  let n = (p.retired_workers || {}).acked_sequences || 0;
  for (const w of Object.values(p.workers)) n += w.acked_sequences || 0;
  return n;
}

function jobCard(p, rate) {
  const share = p.batches_per_epoch ? p.next_batch / p.batches_per_epoch : 0;
  const workers = Object.entries(p.workers).sort(([a], [b]) => a.localeCompare(b)).map(([name, w]) => {
    const flags = el("td");
    if (w.input_bound) flags.append(el("span", { class: "flag input-bound", text: "input-bound" }));
    if (w.straggler) flags.append(el("span", { class: "flag straggler", text: "straggler" }));
    const pct = x => (x === undefined ? "" : `${(100 * x).toFixed(0)}%`);
    const ms = x => (x === undefined ? "" : `${(1000 * x).toFixed(0)} ms`);
    return el("tr", { "data-worker": name },
      el("td", { text: name }), el("td", { text: fmt.format(w.acked) }), el("td", { text: fmt.format(w.redelivered) }),
      el("td", { text: w.reported_batches_per_s === undefined ? "" : w.reported_batches_per_s.toFixed(1) }),
      el("td", { text: pct(w.data_wait_share) }), el("td", { text: ms(w.step_s) }), el("td", { text: ms(w.lease_rtt_s) }),
      flags);
  });
  return el("div", { class: "job", "data-job": p.name },
    el("h2", { text: `${p.name} (${p.dataset}) — ${p.status}` }),
    el("div", {},
      `epoch ${p.epoch}${p.epochs === null ? "" : ` of ${p.epochs}`} `,
      el("span", { class: "bar", title: `batch ${p.next_batch} of ${p.batches_per_epoch}` },
        el("div", { style: `width: ${(100 * Math.min(1, share)).toFixed(1)}%` })),
      ` ${p.next_batch}/${p.batches_per_epoch} handed out; acked `, el("b", { class: "acked", text: fmt.format(p.acked) }),
      `, leased ${p.leased}, redelivered ${p.redelivered}, late acks ${p.late_acks}; `,
      el("b", { text: rate === null ? "…" : `${fmt.format(Math.round(rate))} sequences/s` })),
    el("table", {},
      el("thead", {}, el("tr", {}, ...["worker", "acked", "redelivered", "batches/s", "data wait", "step", "lease RTT", "flags"]
        .map(h => el("th", { text: h })))),
      el("tbody", {}, ...workers)));
}

function drawChart() {
  const canvas = $("throughput");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  const series = Object.entries(state.history).map(([job, points]) => [job, points.filter(p => p.rate !== null)]);
  const all = series.flatMap(([, pts]) => pts);
  canvas.dataset.points = Math.max(0, ...series.map(([, pts]) => pts.length));  // rates drawn, per job at most
  g.fillStyle = "#5b6478";
  g.font = "12px system-ui";
  g.fillText("acked sequences per second", 8, 14);
  if (!all.length) return;
  const t1 = Math.max(...all.map(p => p.t)), t0 = Math.max(t1 - 120, Math.min(...all.map(p => p.t)));
  const span = Math.max(1, t1 - t0);  // the last two minutes at most, the whole width from the first rate on
  const top = Math.max(1, ...all.map(p => p.rate));
  const colours = ["#3a86ff", "#e76f51", "#2a9d8f", "#8338ec", "#fb8500"];
  series.forEach(([job, pts], i) => {
    g.strokeStyle = colours[i % colours.length];
    g.beginPath();
    pts.filter(p => p.t >= t0).forEach((p, k) => {
      const x = 40 + (canvas.width - 260) * (p.t - t0) / span, y = canvas.height - 10 - (canvas.height - 30) * p.rate / top;
      if (k) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
    g.fillStyle = g.strokeStyle;
    g.fillText(job, canvas.width - 200, 30 + 14 * i);
  });
  g.fillStyle = "#5b6478";
  g.fillText(fmt.format(Math.round(top)), 4, 28);
}

async function loadJobs() {
  const { jobs } = await api("/v1/jobs");
  const now = performance.now() / 1000;
  const cards = jobs.map(p => {
    const points = state.history[p.name] || (state.history[p.name] = []);
    const acked = ackedSequences(p);
    const last = points[points.length - 1];
    const rate = last ? Math.max(0, (acked - last.acked) / (now - last.t)) : null;
    points.push({ t: now, acked, rate });
    if (points.length > 600) points.shift();
    return jobCard(p, rate);
  });
  $("job-list").replaceChildren(...(cards.length ? cards : [el("p", { text: "no jobs" })]));
  drawChart();
}

// ---- batch inspector ------------------------------------------------------------------------------------

const vocabularies = {};

async function vocabulary(dataset) {
  if (!vocabularies[dataset]) {
    const tok = await api(`/v1/datasets/${encodeURIComponent(dataset)}/tokenizer`);
    const byId = {};
    for (const [piece, id] of Object.entries((tok.model || {}).vocab || {})) byId[id] = piece;
    for (const t of tok.added_tokens || []) byId[t.id] = t.content;
    const bytelevel = JSON.stringify(tok.pre_tokenizer || {}).includes("ByteLevel");
    vocabularies[dataset] = id => {
      const piece = byId[id] === undefined ? `<${id}>` : byId[id];
      return bytelevel ? piece.replace(/\u0120/g, " ").replace(/\u010a/g, "\u21b5") : piece;
    };
  }
  return vocabularies[dataset];
}

// How each position of a served batch reads: the same rule as `maskserve batch` in the terminal.
function kindOf(input, label, maskId) {
  if (label === -100) return "";
  if (input === maskId) return "masked";
  return input === label ? "kept" : "replaced";
}

async function inspect(form) {
  const data = Object.fromEntries(new FormData(form).entries());
  const dataset = data.dataset;
  delete data.dataset;
  if (data.mode !== "static") delete data.copies;
  const [info, show, batch] = await Promise.all([
    api(`/v1/datasets/${encodeURIComponent(dataset)}`), vocabulary(dataset),
    api(`/v1/datasets/${encodeURIComponent(dataset)}/batch`, { ...data, format: "json", labels: "dense", special_tokens_mask: "true" }),
  ]);
  const maskId = info.special_tokens.mask;
  const rows = batch.input_ids.map((ids, r) => {
    const spans = [];
    ids.forEach((id, c) => {
      if (!batch.attention_mask[r][c]) return;
      const label = batch.labels[r][c];
      const kind = kindOf(id, label, maskId);
      const span = el("span", { class: `tok ${kind}${batch.special_tokens_mask[r][c] ? " special" : ""}`, "data-pos": c,
                                "data-kind": kind || "none", text: show(id) });
      if (kind) span.title = `original: ${show(label)}`;
      spans.push(span);
    });
    return el("div", { class: "row", "data-row": r, "data-sequence": batch.sequence_ids[r] }, ...spans);
  });
  $("rows").replaceChildren(...rows);
}

// ---- wiring ---------------------------------------------------------------------------------------------

const loaders = { datasets: loadDatasetsPage, jobs: loadJobs, inspector: loadDatasets };

async function refresh(tab) {
  try {
    await loaders[tab]();
    showError("");
  } catch (e) {
    showError(e.message);
  }
}

function show(tab) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== tab;
  clearInterval(state.timer);
  refresh(tab);
  if (tab === "jobs" || tab === "datasets") state.timer = setInterval(() => refresh(tab), 2000);
}

for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.tab));
$("token").value = state.token;
$("token-form").addEventListener("submit", e => {
  e.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("maskserve-token", state.token);
  show(document.querySelector("nav button.active").dataset.tab);
});
$("inspect-form").addEventListener("submit", async e => {
  e.preventDefault();
  try { await inspect(e.target); showError(""); } catch (err) { showError(err.message); }
});
show("datasets");
