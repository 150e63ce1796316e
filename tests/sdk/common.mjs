// Shared by the SDK tests: the cluster's address (set by run_sdk_tests.sh), the served model, the
// two official clients, and the relations the tests assert. The default model has random weights,
// so no test compares against fixed text: only against another answer of the same cluster.
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';

export const BASE_URL = process.env.EXPERTMESH_BASE_URL ?? '';
// The key `up` was given (--api-key), and an alias (--model-alias NAME=tiny) as agents use them.
export const API_KEY = process.env.EXPERTMESH_API_KEY ?? '';
export const MODEL_ALIAS = process.env.EXPERTMESH_MODEL_ALIAS ?? '';
// Per request; generous for a loaded 2-core machine, far below the test's ctest timeout.
const REQUEST_TIMEOUT_MS = 45_000;

export function requireBaseUrl() {
  const how = '(run the tests through run_sdk_tests.sh)';
  assert.match(BASE_URL, /^http:\/\/127\.0\.0\.1:\d+$/, `EXPERTMESH_BASE_URL must be the gateway URL ${how}`);
  assert.ok(API_KEY !== '', `EXPERTMESH_API_KEY must be the gateway's key ${how}`);
  assert.ok(MODEL_ALIAS !== '', `EXPERTMESH_MODEL_ALIAS must be a --model-alias name ${how}`);
}

let servedModel;
// The id the gateway serves (GET /v1/models), e.g. "tiny" for var/models/tiny.
export async function modelId() {
  if (servedModel === undefined) {
    requireBaseUrl();
    const r = await fetch(`${BASE_URL}/v1/models`, {
      headers: { authorization: `Bearer ${API_KEY}` }, signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    assert.equal(r.status, 200, await r.clone().text());
    const body = await r.json();
    assert.ok(Array.isArray(body.data) && body.data.length >= 1, JSON.stringify(body));
    servedModel = body.data[0].id;
    assert.equal(typeof servedModel, 'string');
  }
  return servedModel;
}

// A fetch that records each request's method and URL, to check the routes the SDKs use.
export function recordingFetch(log) {
  return (url, init) => {
    log.push({ method: init?.method ?? 'GET', url: String(url) });
    return fetch(url, init);
  };
}

export function openai(options = {}) {
  requireBaseUrl();
  return new OpenAI({
    baseURL: `${BASE_URL}/v1`, apiKey: API_KEY, maxRetries: 0, timeout: REQUEST_TIMEOUT_MS,
    ...options,
  });
}

export function anthropic(options = {}) {
  requireBaseUrl();
  return new Anthropic({
    baseURL: BASE_URL, apiKey: API_KEY, maxRetries: 0, timeout: REQUEST_TIMEOUT_MS, ...options,
  });
}

export const SYSTEM = 'You are a terse assistant.';
export const USER = 'Name three rivers and one mountain.';

// A stop string that really occurs in `text`: three code points from its middle (so the answer
// stops after a non-empty prefix). Returns the string and the text before its first occurrence,
// which is what a greedy answer with that stop string must be.
export function stopStringFrom(text) {
  const cps = Array.from(text);
  assert.ok(cps.length >= 8, `the greedy answer is too short to pick a stop string from: ${JSON.stringify(text)}`);
  // Skip whitespace-only picks: they are legal but test less (and read badly in failures).
  for (let i = Math.floor(cps.length / 2); i + 3 <= cps.length; i++) {
    const stop = cps.slice(i, i + 3).join('');
    if (stop.trim() !== '') return { stop, before: text.slice(0, text.indexOf(stop)) };
  }
  assert.fail(`no usable stop string in ${JSON.stringify(text)}`);
}

// V4 tool-call markup, which the gateway's parser must never let into answer text.
export function assertNoToolMarkup(text, where) {
  assert.ok(!text.includes('｜DSML｜'), `${where} contains DSML markup: ${JSON.stringify(text)}`);
}
