// Checks that every query of the monitoring/ files returns data from a live Prometheus:
// every target expression of the dashboards (monitoring/dashboards/*.json), and every rule
// Prometheus loaded from monitoring/rules (read back from /api/v1/rules, so they are exactly the
// files' rules), alerts with their final comparison stripped (an alert that is not firing
// returns nothing, yet what it compares must exist). Polls until all have data or the deadline,
// then names every one that stayed empty or failed.
// Usage: node check_queries.mjs PROMETHEUS_URL DASHBOARD_DIR EXPECTED_RULES DEADLINE_S
import fs from 'node:fs';
import path from 'node:path';

const [promUrl, dashDir, expectedRulesArg, deadlineArg] = process.argv.slice(2);
if (!promUrl || !dashDir || !expectedRulesArg || !deadlineArg) {
  console.error('usage: check_queries.mjs PROMETHEUS_URL DASHBOARD_DIR EXPECTED_RULES DEADLINE_S');
  process.exit(2);
}
const deadline = Date.now() + Number(deadlineArg) * 1000;

// Cuts `expr` at its last comparison outside parentheses, braces, brackets and strings:
// `a / b > 0.9` -> `a / b`. Label matchers (`{code=~"5.."}`) are inside braces, so untouched.
export function stripComparison(expr) {
  let depth = 0, quote = null, cut = -1;
  for (let i = 0; i < expr.length; i++) {
    const c = expr[i];
    if (quote) { if (c === '\\') i++; else if (c === quote) quote = null; continue; }
    if (c === '"' || c === "'" || c === '`') { quote = c; continue; }
    if ('({['.includes(c)) depth++;
    else if (')}]'.includes(c)) depth--;
    else if (depth === 0) {
      const two = expr.slice(i, i + 2);
      if (['==', '!=', '>=', '<='].includes(two)) { cut = i; i++; }
      else if (c === '>' || c === '<') cut = i;
    }
  }
  return cut < 0 ? expr.trim() : expr.slice(0, cut).trim();
}

async function getJson(url) {
  const ctl = AbortSignal.timeout(5000);
  const res = await fetch(url, { signal: ctl });
  const body = await res.json();
  if (body.status !== 'success') throw new Error(`${url}: ${body.error || res.status}`);
  return body.data;
}

const queries = [];  // {what, expr}
for (const file of fs.readdirSync(dashDir).filter((f) => f.endsWith('.json')).sort()) {
  const dash = JSON.parse(fs.readFileSync(path.join(dashDir, file), 'utf8'));
  for (const field of ['schemaVersion', 'title', 'uid', 'panels']) {
    if (dash[field] === undefined) throw new Error(`${file}: field ${field} is missing`);
  }
  if (dash.panels.length === 0) throw new Error(`${file}: panels is empty`);
  for (const p of dash.panels) {
    if (!Array.isArray(p.targets) || p.targets.length === 0) {
      throw new Error(`${file}: panel "${p.title}" has no targets`);
    }
    for (const t of p.targets) {
      if (typeof t.expr !== 'string' || !t.expr) throw new Error(`${file}: panel "${p.title}" target ${t.refId} has no expr`);
      queries.push({ what: `${file} "${p.title}" ${t.refId}`, expr: t.expr });
    }
  }
}

const rules = (await getJson(`${promUrl}/api/v1/rules`)).groups.flatMap((g) => g.rules);
if (rules.length !== Number(expectedRulesArg)) {
  console.error(`Prometheus loaded ${rules.length} rules, the rule files hold ${expectedRulesArg}`);
  process.exit(1);
}
for (const r of rules) {
  if (r.type === 'recording') queries.push({ what: `recording rule ${r.name}`, expr: r.query });
  else queries.push({ what: `alert ${r.name} (comparison stripped)`, expr: stripComparison(r.query) });
}

let pending = queries;
let lastError = new Map();
for (;;) {
  const still = [];
  for (const q of pending) {
    try {
      const data = await getJson(`${promUrl}/api/v1/query?query=${encodeURIComponent(q.expr)}`);
      if (data.result.length === 0) { still.push(q); lastError.set(q, 'empty result'); }
    } catch (e) {
      still.push(q); lastError.set(q, String(e.message || e));
    }
  }
  // Rules whose evaluation fails are a broken file even if the query happens to return data.
  const broken = (await getJson(`${promUrl}/api/v1/rules`)).groups.flatMap((g) => g.rules)
    .filter((r) => r.health === 'err');
  pending = still;
  if (pending.length === 0 && broken.length === 0) break;
  if (Date.now() > deadline) {
    for (const r of broken) console.error(`rule ${r.name}: evaluation error: ${r.lastError}`);
    for (const q of pending) console.error(`${q.what}: ${lastError.get(q)}\n    ${q.expr}`);
    console.error(`${pending.length} of ${queries.length} queries returned no data`);
    process.exit(1);
  }
  await new Promise((r) => setTimeout(r, 1000));
}
console.log(`all ${queries.length} queries (${rules.length} rules, ${queries.length - rules.length} dashboard targets) returned data`);
