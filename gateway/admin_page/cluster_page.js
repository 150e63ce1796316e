// The live cluster page: polls /api/cluster (served by the gateway's admin listener) about once
// a second and redraws. Rates are computed here from the difference of two snapshots, so the
// gateway keeps no history.
'use strict';

const POLL_MS = 1000;
const FETCH_TIMEOUT_MS = 4000;  // above the gateway's own RPC and scrape deadlines

let previous = null;       // the last snapshot, for rates
let gridShape = '';        // "layers x experts" the heatmap was built for
const cells = new Map();   // "layer/expert" -> cell element

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmtCount(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1) + 'G';
  if (n >= 1e6) return (n / 1e6).toFixed(1) + 'M';
  if (n >= 1e4) return (n / 1e3).toFixed(0) + 'k';
  return String(Math.round(n));
}

function fmtBytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
}

function fmtSeconds(s) {
  if (!Number.isFinite(s)) return '–';
  if (s < 0.001) return (s * 1e6).toFixed(0) + ' µs';
  return s < 1 ? (s * 1000).toFixed(1) + ' ms' : s.toFixed(2) + ' s';
}

// Rate of a counter between two snapshots (per second); null without an earlier one.
function rate(now, before, name, dtS) {
  if (!before || dtS <= 0) return null;
  const a = (now.metrics || {})[name];
  const b = (before.metrics || {})[name];
  if (a === undefined || b === undefined || a < b) return null;
  return (a - b) / dtS;
}

// Mean of a histogram over the interval (or since start without an earlier snapshot).
function meanLatency(now, before, base) {
  const m = now.metrics || {};
  const p = (before && before.metrics) || {};
  let sum = m[base + '_sum'];
  let count = m[base + '_count'];
  if (sum === undefined || count === undefined) return null;
  if (p[base + '_count'] !== undefined && count > p[base + '_count']) {
    sum -= p[base + '_sum'];
    count -= p[base + '_count'];
  }
  return count > 0 ? sum / count : null;
}

function workerColour(index, count, lightness) {
  const hue = Math.round((index * 360) / Math.max(count, 1) + 200) % 360;
  return `hsl(${hue}, 65%, ${lightness}%)`;
}

function renderSummary(snap, dtS) {
  const box = document.getElementById('summary');
  const members = snap.members || [];
  let tokS = 0, haveRate = false, ttft = null, e2e = null;
  for (const m of members) {
    const before = previous && (previous.members || []).find((x) => x.worker_id === m.worker_id);
    if (m.kind === 'gateway') {
      const r = rate(m, before, 'expertmesh_gateway_generation_tokens_total', dtS);
      if (r !== null) { tokS += r; haveRate = true; }
      ttft = meanLatency(m, before, 'expertmesh_gateway_time_to_first_token_seconds') ?? ttft;
      e2e = meanLatency(m, before, 'expertmesh_gateway_request_duration_seconds') ?? e2e;
    }
  }
  const p = snap.placement;
  const cards = [
    ['members', String(members.length)],
    ['unreachable', String(members.filter((m) => !m.reachable).length)],
    ['placement version', p ? String(p.version) : '–'],
    ['unplaced experts', p ? String(p.unplaced.length) : '–'],
    ['generated tokens/s', haveRate ? tokS.toFixed(1) : '–'],
    ['mean time to first token', ttft === null ? '–' : fmtSeconds(ttft)],
    ['mean request latency', e2e === null ? '–' : fmtSeconds(e2e)],
  ];
  box.replaceChildren(...cards.map(([k, v]) => {
    const c = el('div', { class: 'card', 'data-card': k });
    c.append(el('div', { class: 'v' }, v), el('div', { class: 'k' }, k));
    return c;
  }));
}

function renderMembers(snap, dtS) {
  const body = document.querySelector('#members tbody');
  const rows = (snap.members || []).map((m) => {
    const before = previous && (previous.members || []).find((x) => x.worker_id === m.worker_id);
    let tokS = null, latency = null, detail = '';
    if (m.kind === 'expert') {
      tokS = rate(m, before, 'expertmesh_expert_tokens_total', dtS);
      latency = meanLatency(m, before, 'expertmesh_expert_dispatch_seconds');
      detail = `${m.expert_tokens.length} experts loaded`;
    } else if (m.kind === 'gateway') {
      tokS = rate(m, before, 'expertmesh_gateway_generation_tokens_total', dtS);
      latency = meanLatency(m, before, 'expertmesh_gateway_request_duration_seconds');
      detail = `${m.metrics.expertmesh_gateway_active_streams ?? 0} active streams`;
    } else if (m.kind === 'attention') {
      detail = `${m.active_sequences} active, ${m.queued_sequences} queued sequences`;
    } else if (m.kind === 'kv_store' && Array.isArray(m.kv_tiers)) {
      detail = m.kv_tiers.map((t) => `${t.tier}: ${t.blocks} blocks`).join(', ');
    }
    const tr = el('tr', {
      'data-worker-id': String(m.worker_id),
      class: !m.reachable ? 'dead' : m.state === 'suspect' ? 'suspect' : '',
    });
    const cols = [
      String(m.worker_id), m.kind, m.address, m.state, `${m.ms_since_heartbeat} ms ago`,
      m.reachable ? 'yes' : 'no' + (m.error ? ` (${m.error})` : ''),
      tokS === null ? '–' : tokS.toFixed(1),
      latency === null ? '–' : fmtSeconds(latency), detail,
    ];
    for (const c of cols) tr.append(el('td', {}, c));
    return tr;
  });
  body.replaceChildren(...rows);
}

function renderKv(snap) {
  const body = document.querySelector('#kv-tiers tbody');
  const rows = [];
  for (const m of snap.members || []) {
    if (!Array.isArray(m.kv_tiers)) continue;
    for (const t of m.kv_tiers) {
      const lookups = t.hits + t.misses;
      const tr = el('tr', { 'data-tier': t.tier });
      const cols = [
        t.tier, String(t.blocks), fmtBytes(t.bytes),
        t.capacity_bytes ? fmtBytes(t.capacity_bytes) : 'not configured',
        t.capacity_bytes ? ((100 * t.bytes) / t.capacity_bytes).toFixed(1) + '%' : '–',
        lookups ? ((100 * t.hits) / lookups).toFixed(1) + '%' : '–', String(t.evictions),
      ];
      for (const c of cols) tr.append(el('td', {}, c));
      rows.push(tr);
    }
  }
  body.replaceChildren(...rows);
}

function buildGrid(layers, experts) {
  const grid = document.getElementById('heatmap');
  grid.style.gridTemplateColumns = `40px repeat(${experts}, 34px)`;
  const parts = [el('div', { class: 'axis' }, 'L \\ E')];
  for (let e = 0; e < experts; e++) parts.push(el('div', { class: 'axis' }, String(e)));
  cells.clear();
  for (let l = 0; l < layers; l++) {
    parts.push(el('div', { class: 'axis' }, String(l)));
    for (let e = 0; e < experts; e++) {
      const c = el('div', { class: 'cell', 'data-layer': String(l), 'data-expert': String(e),
        'data-worker': '', 'data-tokens': '0' }, '');
      cells.set(`${l}/${e}`, c);
      parts.push(c);
    }
  }
  grid.replaceChildren(...parts);
}

function renderHeatmap(snap) {
  const p = snap.placement;
  let layers = snap.model ? snap.model.layers : 0;
  let experts = snap.model ? snap.model.experts : 0;
  // Without a model config the grid spans what the placement names.
  if (p) {
    for (const [l, e] of p.experts) { layers = Math.max(layers, l + 1); experts = Math.max(experts, e + 1); }
  }
  const shape = `${layers}x${experts}`;
  if (shape !== gridShape) { buildGrid(layers, experts); gridShape = shape; }

  const tokens = new Map();
  let max = 0;
  for (const m of snap.members || []) {
    for (const [l, e, n] of m.expert_tokens || []) {
      const k = `${l}/${e}`;
      const v = (tokens.get(k) || 0) + n;
      tokens.set(k, v);
      max = Math.max(max, v);
    }
  }
  const workerIds = p ? Object.keys(p.workers).map(Number).sort((a, b) => a - b) : [];
  const hosting = new Map();
  if (p) for (const [l, e, ids] of p.experts) hosting.set(`${l}/${e}`, ids);
  for (const [k, c] of cells) {
    const ids = hosting.get(k) || [];
    const n = tokens.get(k) || 0;
    c.dataset.worker = ids.length ? String(ids[0]) : '';
    c.dataset.replicas = ids.join(',');
    c.dataset.tokens = String(n);
    c.textContent = fmtCount(n);
    const [l, e] = k.split('/');
    c.title = `layer ${l}, expert ${e}: ` +
      (ids.length ? `worker ${ids.join(', ')} (${p.workers[ids[0]] || '?'})` : 'no live worker') +
      `, ${n} tokens`;
    if (ids.length) {
      const light = 88 - (max > 0 ? (33 * Math.log1p(n)) / Math.log1p(max) : 0);
      c.style.background = workerColour(workerIds.indexOf(ids[0]), workerIds.length, light);
    } else {
      c.style.background = '';
    }
  }
  document.getElementById('placement-version').textContent =
    p ? `version ${p.version}, ${p.unplaced.length} unplaced` : '(router unreachable)';
  const legend = document.getElementById('legend');
  legend.replaceChildren(...workerIds.map((id, i) => {
    const s = el('span', { 'data-worker': String(id) });
    const sw = el('i');
    sw.style.background = workerColour(i, workerIds.length, 65);
    s.append(sw, document.createTextNode(`worker ${id} ${p.workers[id]}`));
    return s;
  }));
}

function setStatus(state, text) {
  const s = document.getElementById('status');
  s.dataset.state = state;
  s.textContent = text;
}

async function poll() {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
  try {
    const resp = await fetch('/api/cluster', { signal: ctrl.signal, cache: 'no-store' });
    if (!resp.ok) throw new Error(`/api/cluster answered ${resp.status}`);
    const snap = await resp.json();
    const dtS = previous ? (snap.time_ms - previous.time_ms) / 1000 : 0;
    renderSummary(snap, dtS);
    renderMembers(snap, dtS);
    renderKv(snap);
    renderHeatmap(snap);
    previous = snap;
    const when = new Date(snap.time_ms).toLocaleTimeString();
    if (snap.router && snap.router.ok) setStatus('ok', `live · ${when}`);
    else setStatus('error', `router ${snap.router ? snap.router.address : ''}: ${snap.router && snap.router.error}`);
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (err) {
    // Shown on the page, not thrown: a gateway restart must not leave errors in the console.
    setStatus('error', `cannot read /api/cluster: ${err.message || err}`);
  } finally {
    clearTimeout(timer);
    setTimeout(poll, POLL_MS);
  }
}

poll();
