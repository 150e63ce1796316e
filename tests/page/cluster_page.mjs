// Drives the gateway's cluster page in headless system Chromium (playwright-core, no bundled
// browser) against a live cluster started by run_page_test.sh, and fails on the first broken
// promise of docs/cluster_page.md.
// Env: EXPERTMESH_ADMIN_URL, EXPERTMESH_BASE_URL, EXPERTMESH_MODEL_DIR, PAGE_OUT_DIR,
// CHROMIUM (default /usr/bin/chromium).
import { readFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const adminUrl = process.env.EXPERTMESH_ADMIN_URL;
const baseUrl = process.env.EXPERTMESH_BASE_URL;
const modelDir = process.env.EXPERTMESH_MODEL_DIR;
const outDir = process.env.PAGE_OUT_DIR;
const browserPath = process.env.CHROMIUM || '/usr/bin/chromium';
for (const [k, v] of Object.entries({ adminUrl, baseUrl, modelDir, outDir })) {
  if (!v) throw new Error(`${k} is not set`);
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.error(`ok: ${what}`);
}

async function waitFor(what, fn, timeoutMs) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function chat(i) {
  const resp = await fetch(`${baseUrl}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      model: 'tiny',
      messages: [{ role: 'user', content: `page test request ${i}: count the experts` }],
      max_tokens: 12,
    }),
    signal: AbortSignal.timeout(60000),
  });
  if (resp.status !== 200) throw new Error(`chat request ${i}: HTTP ${resp.status}: ${await resp.text()}`);
  await resp.json();
}

const config = JSON.parse(readFileSync(join(modelDir, 'config.json'), 'utf8'));
const layers = config.num_hidden_layers + (config.num_nextn_predict_layers || 0);
const experts = config.n_routed_experts;
check(layers > 0 && experts > 0, `model config gives ${layers} layers x ${experts} experts`);

const problems = [];  // console errors, page exceptions, failed requests
const browser = await chromium.launch({
  executablePath: browserPath,
  headless: true,
  // Root on CI: Chromium refuses to start its sandbox as root.
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'],
  timeout: 60000,
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
  page.on('pageerror', (e) => problems.push(`page exception: ${e.message}`));
  page.on('requestfailed', (r) => problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  page.on('response', (r) => { if (r.status() >= 400) problems.push(`HTTP ${r.status()} for ${r.url()}`); });

  await page.goto(adminUrl, { waitUntil: 'load', timeout: 30000 });
  await waitFor('the first poll', () => page.evaluate(() => Number(document.body.dataset.polls || 0) >= 1), 30000);

  const cellCount = await page.locator('#heatmap .cell').count();
  check(cellCount === layers * experts, `${cellCount} heatmap cells = ${layers} x ${experts}`);

  // Every cell names the worker the router reports first for its (layer, expert). The table may
  // change between the two reads (a re-placement), so compare against the same version a few
  // times before giving up.
  let mismatch = 'not compared';
  for (let attempt = 0; attempt < 5 && mismatch; attempt++) {
    const snap = await (await fetch(`${adminUrl}api/cluster`)).json();
    check(snap.router.ok, 'the router answers /api/cluster');
    const want = new Map();
    for (const [l, e, ids] of snap.placement.experts) want.set(`${l}/${e}`, ids.length ? String(ids[0]) : '');
    await waitFor('a poll after the snapshot', async () =>
      (await page.evaluate(() => document.getElementById('placement-version').textContent))
        .startsWith(`version ${snap.placement.version},`), 10000);
    const cells = await page.$$eval('#heatmap .cell', (els) => els.map((c) =>
      [c.dataset.layer, c.dataset.expert, c.dataset.worker]));
    mismatch = '';
    const seen = new Set();
    for (const [l, e, w] of cells) {
      const k = `${l}/${e}`;
      if (seen.has(k)) { mismatch = `cell ${k} appears twice`; break; }
      seen.add(k);
      if (Number(l) >= layers || Number(e) >= experts) { mismatch = `cell ${k} outside the model`; break; }
      if ((want.get(k) ?? '') !== w) { mismatch = `cell ${k}: data-worker "${w}", router says "${want.get(k) ?? ''}"`; break; }
      if (w === '') { mismatch = `cell ${k} has no worker`; break; }
    }
    if (mismatch) await new Promise((r) => setTimeout(r, 1000));
  }
  check(!mismatch, `every cell's data-worker matches the router's placement${mismatch ? ' (' + mismatch + ')' : ''}`);
  const workersShown = await page.$$eval('#heatmap .cell', (els) => new Set(els.map((c) => c.dataset.worker)).size);
  check(workersShown >= 2, `cells are spread over ${workersShown} workers`);

  const memberRows = await page.locator('#members tbody tr').count();
  check(memberRows >= 5, `${memberRows} member rows`);
  const kvRows = await page.locator('#kv-tiers tbody tr').count();
  check(kvRows >= 1, `${kvRows} KV tier rows`);

  const pageTokens = () => page.$$eval('#heatmap .cell', (els) =>
    els.reduce((s, c) => s + Number(c.dataset.tokens || 0), 0));
  // Counts grow with each batch of requests: twice, so that one lucky poll cannot pass it.
  let before = await pageTokens();
  for (let batch = 0; batch < 2; batch++) {
    await Promise.all([0, 1, 2].map((i) => chat(batch * 10 + i)));
    const after = await waitFor(`token counts above ${before} after batch ${batch}`, async () => {
      const t = await pageTokens();
      return t > before ? t : 0;
    }, 30000);
    check(after > before, `page token counts grew ${before} -> ${after} with batch ${batch}`);
    before = after;
  }
  const shown = await page.$$eval('#heatmap .cell', (els) => els.filter((c) => c.textContent !== '0').length);
  check(shown > 0, `${shown} cells show nonzero token counts`);

  mkdirSync(outDir, { recursive: true });
  const shot = join(outDir, 'cluster_page.png');
  await page.screenshot({ path: shot, fullPage: true });
  console.error(`screenshot: ${shot}`);
  check(problems.length === 0, `no console errors (${problems.join('; ') || 'none'})`);
} finally {
  await browser.close();
}
console.error('cluster_page_test: all checks passed');
