// The official `@anthropic-ai/sdk` node client against the gateway's Anthropic API
// (/v1/messages, /v1/messages/count_tokens, /v1/messages?beta=true): messages, stream events and
// the final message, token counting, stop sequences, tools, thinking, the beta route, errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Anthropic from '@anthropic-ai/sdk';
import {
  API_KEY, MODEL_ALIAS, SYSTEM, USER, anthropic, assertNoToolMarkup, modelId, recordingFetch,
  stopStringFrom,
} from './common.mjs';

const MAX_TOKENS = 24;
const requests = [];
const client = anthropic({ fetch: recordingFetch(requests) });

const greedy = async (extra = {}) => ({
  model: await modelId(), system: SYSTEM, messages: [{ role: 'user', content: USER }],
  max_tokens: MAX_TOKENS, temperature: 0, ...extra,
});
const textOf = (message) => message.content.filter((b) => b.type === 'text').map((b) => b.text).join('');

let reference;  // the non-streamed greedy message, shared by the tests below
async function referenceMessage() {
  reference ??= await client.messages.create(await greedy());
  return reference;
}

// Reads a MessageStream to the end: its events and finalMessage().
async function streamAll(params, api = client.messages) {
  const stream = api.stream(params);
  const events = [];
  for await (const event of stream) events.push(event);
  return { events, final: await stream.finalMessage() };
}

// The event grammar: message_start, then blocks (start, deltas of the block's kind, stop) in index
// order, message_delta, message_stop; pings anywhere. Returns the text of each block's deltas.
function checkEventGrammar(events) {
  const seq = events.filter((e) => e.type !== 'ping');
  assert.equal(seq[0]?.type, 'message_start', JSON.stringify(seq[0]));
  assert.equal(seq.at(-1)?.type, 'message_stop');
  assert.equal(seq.at(-2)?.type, 'message_delta');
  const blocks = [];
  let open = null;
  for (const e of seq.slice(1, -2)) {
    if (e.type === 'content_block_start') {
      assert.equal(open, null, 'a block starts while another is open');
      assert.equal(e.index, blocks.length);
      open = { type: e.content_block.type, text: '', json: '' };
      blocks.push(open);
    } else if (e.type === 'content_block_delta') {
      assert.notEqual(open, null, 'a delta outside a block');
      assert.equal(e.index, blocks.length - 1);
      const expected = { text: 'text_delta', thinking: 'thinking_delta', tool_use: 'input_json_delta' };
      if (e.delta.type === 'signature_delta') {
        assert.equal(open.type, 'thinking');
      } else {
        assert.equal(e.delta.type, expected[open.type], `${e.delta.type} in a ${open.type} block`);
      }
      open.text += e.delta.text ?? e.delta.thinking ?? '';
      open.json += e.delta.partial_json ?? '';
    } else if (e.type === 'content_block_stop') {
      assert.notEqual(open, null);
      assert.equal(e.index, blocks.length - 1);
      open = null;
    } else {
      assert.fail(`unexpected event between message_start and message_delta: ${JSON.stringify(e)}`);
    }
  }
  assert.equal(open, null, 'a block was never stopped');
  return { start: seq[0], delta: seq.at(-2), blocks };
}

// The whole prompt: Anthropic's input_tokens count only what follows the last cache hit (a
// prefix the kv-store held is in cache_read_input_tokens), and count_tokens counts it all.
const promptTokens = (u) => u.input_tokens + (u.cache_read_input_tokens ?? 0);

function assertMessageShape(m, maxTokens) {
  assert.equal(m.type, 'message');
  assert.equal(m.role, 'assistant');
  assert.match(m.id, /^msg_/);
  assert.equal(m.model, reference?.model ?? m.model);
  assert.ok(Array.isArray(m.content) && m.content.length >= 1, JSON.stringify(m.content));
  assert.ok(Number.isInteger(m.usage.input_tokens) && m.usage.input_tokens > 0, JSON.stringify(m.usage));
  assert.ok(Number.isInteger(m.usage.output_tokens) && m.usage.output_tokens >= 1 &&
    m.usage.output_tokens <= maxTokens, JSON.stringify(m.usage));
  if (m.stop_reason === 'max_tokens') assert.equal(m.usage.output_tokens, maxTokens);
  for (const b of m.content) if (b.type === 'text') assertNoToolMarkup(b.text, 'a text block');
}

test('messages.create: a text message with consistent usage', async () => {
  const m = await referenceMessage();
  assertMessageShape(m, MAX_TOKENS);
  assert.equal(m.model, await modelId());
  assert.deepEqual(m.content.map((b) => b.type), ['text']);
  assert.ok(m.content[0].text.length > 0);
  assert.ok(['end_turn', 'max_tokens'].includes(m.stop_reason), m.stop_reason);
  assert.equal(m.stop_sequence, null);
  assert.equal(m.usage.cache_read_input_tokens, 0);
  const again = await client.messages.create(await greedy());
  assert.equal(textOf(again), textOf(m));
  assert.deepEqual(again.usage, m.usage);
});

test('messages.stream: the events, the real input_tokens at message_start, finalMessage', async () => {
  const ref = await referenceMessage();
  const { events, final } = await streamAll(await greedy());
  const { start, delta, blocks } = checkEventGrammar(events);
  // (start.message is the SDK's running snapshot, so its content is not checked here.)
  assert.equal(start.message.role, 'assistant');
  assert.equal(start.message.usage.input_tokens, ref.usage.input_tokens);
  assert.deepEqual(blocks.map((b) => b.type), ['text']);
  assert.equal(blocks[0].text, textOf(ref));
  assert.equal(delta.delta.stop_reason, ref.stop_reason);
  assert.equal(delta.delta.stop_sequence, null);
  assert.equal(delta.usage.output_tokens, ref.usage.output_tokens);
  assert.equal(textOf(final), textOf(ref));
  assert.equal(final.stop_reason, ref.stop_reason);
  assert.equal(final.usage.input_tokens, ref.usage.input_tokens);
  assert.equal(final.usage.output_tokens, ref.usage.output_tokens);

  // The raw events (create with stream: true, no accumulation): message_start as sent, with the
  // prompt's real size (agents size their context from it, so 0 here is a bug).
  const raw = [];
  for await (const e of await client.messages.create(await greedy({ stream: true }))) raw.push(e);
  const rawStart = raw.find((e) => e.type === 'message_start');
  assert.deepEqual(rawStart.message.content, []);
  assert.equal(rawStart.message.stop_reason, null);
  assert.equal(rawStart.message.usage.input_tokens, ref.usage.input_tokens);
  assert.deepEqual(checkEventGrammar(raw).blocks, blocks);
});

test('messages.countTokens equals usage.input_tokens of the same request', async () => {
  const ref = await referenceMessage();
  const { max_tokens, temperature, ...countable } = await greedy();
  const counted = await client.messages.countTokens(countable);
  assert.equal(counted.input_tokens, promptTokens(ref.usage));
  // A different prompt is counted differently: the count is of this request.
  const longer = await client.messages.countTokens({
    ...countable, messages: [{ role: 'user', content: `${USER} ${USER}` }],
  });
  assert.ok(longer.input_tokens > counted.input_tokens);
});

test('stop_sequences: stop_reason stop_sequence, the string reported, never emitted', async () => {
  const long = await client.messages.create(await greedy({ max_tokens: 40 }));
  const { stop, before } = stopStringFrom(textOf(long));
  const m = await client.messages.create(await greedy({ max_tokens: 40, stop_sequences: [stop] }));
  assert.equal(m.stop_reason, 'stop_sequence');
  assert.equal(m.stop_sequence, stop);
  assert.equal(textOf(m), before);

  const { events, final } = await streamAll(await greedy({ max_tokens: 40, stop_sequences: ['\u0000never', stop] }));
  const { delta, blocks } = checkEventGrammar(events);
  assert.equal(delta.delta.stop_reason, 'stop_sequence');
  assert.equal(delta.delta.stop_sequence, stop);
  const streamed = blocks.map((b) => b.text).join('');
  assert.ok(!streamed.includes(stop));
  assert.equal(streamed, before);
  assert.equal(final.stop_sequence, stop);
});

const TOOLS = [{
  name: 'get_weather',
  description: 'Current weather for a city.',
  input_schema: {
    type: 'object',
    properties: { city: { type: 'string' }, unit: { type: 'string', enum: ['c', 'f'] } },
    required: ['city'],
  },
}];

function assertToolMessage(m) {
  assertMessageShape(m, MAX_TOKENS);
  for (const b of m.content) {
    assert.ok(['text', 'tool_use'].includes(b.type), b.type);
    if (b.type === 'tool_use') {
      assert.match(b.id, /^toolu_/);
      assert.equal(b.name, 'get_weather');
      assert.equal(typeof b.input, 'object');
    }
  }
  const uses = m.content.filter((b) => b.type === 'tool_use').length;
  if (uses > 0) assert.equal(m.stop_reason, 'tool_use');
  else assert.ok(['end_turn', 'max_tokens'].includes(m.stop_reason), m.stop_reason);
}

test('tools: accepted, counted, a valid message; a tool_result turn is accepted', async () => {
  const plain = await referenceMessage();
  const params = await greedy({ tools: TOOLS, tool_choice: { type: 'auto' } });
  const m = await client.messages.create(params);
  assertToolMessage(m);
  assert.ok(promptTokens(m.usage) > promptTokens(plain.usage),
    `${promptTokens(m.usage)} prompt tokens with tools, ${promptTokens(plain.usage)} without`);
  const { max_tokens, temperature, ...countable } = params;
  assert.equal((await client.messages.countTokens(countable)).input_tokens, promptTokens(m.usage));

  // Streamed: the same blocks; a tool_use block gets only input_json_delta (checked by the grammar).
  const { events, final } = await streamAll(params);
  const { blocks } = checkEventGrammar(events);
  assert.deepEqual(blocks.map((b) => b.type), m.content.map((b) => b.type));
  blocks.forEach((b, i) => {
    if (b.type === 'tool_use') assert.deepEqual(JSON.parse(b.json || '{}'), m.content[i].input);
    else assert.equal(b.text, m.content[i].text);
  });
  assert.equal(final.stop_reason, m.stop_reason);

  const followUp = await client.messages.create(await greedy({
    tools: TOOLS,
    messages: [
      { role: 'user', content: USER },
      { role: 'assistant', content: [
        { type: 'text', text: 'Checking.' },
        { type: 'tool_use', id: 'toolu_01', name: 'get_weather', input: { city: 'Lyon' } }] },
      { role: 'user', content: [{ type: 'tool_result', tool_use_id: 'toolu_01', content: '21 C' }] },
    ],
  }));
  assertToolMessage(followUp);
  assert.ok(promptTokens(followUp.usage) > promptTokens(m.usage));
});

test('thinking: a thinking block before the text, streamed as thinking_delta', async () => {
  const params = await greedy({ max_tokens: 32, thinking: { type: 'adaptive' } });
  const m = await client.messages.create(params);
  assertMessageShape(m, 32);
  const types = m.content.map((b) => b.type);
  assert.equal(types[0], 'thinking', JSON.stringify(types));
  assert.ok(m.content[0].thinking.length > 0);
  assert.equal(typeof m.content[0].signature, 'string');
  assert.ok(types.slice(1).every((t) => t === 'text'), JSON.stringify(types));

  const { events, final } = await streamAll(params);
  const { blocks } = checkEventGrammar(events);
  assert.deepEqual(blocks.map((b) => b.type), types);
  assert.equal(blocks[0].text, m.content[0].thinking);
  assert.equal(final.content[0].thinking, m.content[0].thinking);
  assert.equal(textOf(final), textOf(m));

  // A budget (>= 1024 and below max_tokens, as the API requires) caps the thinking: this model
  // never closes its thinking by itself, so an answer after it shows the cap was applied.
  const budgeted = await client.messages.create(
    await greedy({ max_tokens: 1040, thinking: { type: 'enabled', budget_tokens: 1024 } }));
  assertMessageShape(budgeted, 1040);
  assert.equal(budgeted.content[0].type, 'thinking');
  assert.ok(budgeted.content[0].thinking.length > 0);
  assert.ok(textOf(budgeted).length > 0, 'no answer after a thinking budget of 1024 tokens');
});

test('beta route: client.beta.messages (and /v1/messages?beta=true) give the same message', async () => {
  const ref = await referenceMessage();
  requests.length = 0;
  const m = await client.beta.messages.create(await greedy());
  assert.equal(requests.length, 1);
  assert.equal(requests[0].method, 'POST');
  assert.equal(new URL(requests[0].url).pathname, '/v1/messages');
  assert.equal(textOf(m), textOf(ref));
  assert.deepEqual(m.usage.input_tokens, ref.usage.input_tokens);

  // The request a coding agent sends: the beta query and an anthropic-beta header.
  requests.length = 0;
  const tagged = await client.beta.messages.create(
    await greedy({ betas: ['interleaved-thinking-2025-05-14'] }), { query: { beta: 'true' } });
  const url = new URL(requests[0].url);
  assert.equal(url.pathname, '/v1/messages');
  assert.equal(url.searchParams.get('beta'), 'true');
  assert.equal(textOf(tagged), textOf(ref));

  const stream = client.beta.messages.stream(await greedy(), { query: { beta: 'true' } });
  const final = await stream.finalMessage();
  assert.equal(textOf(final), textOf(ref));
});

test('errors: unknown model is NotFoundError, a bad temperature is BadRequestError', async () => {
  await assert.rejects(
    client.messages.create({ ...(await greedy()), model: 'no-such-model' }),
    (e) => {
      assert.ok(e instanceof Anthropic.NotFoundError, `${e.constructor.name}: ${e.message}`);
      assert.equal(e.status, 404);
      assert.equal(e.error?.type, 'error');
      assert.equal(e.error?.error?.type, 'not_found_error');
      return true;
    });
  await assert.rejects(
    client.messages.create(await greedy({ temperature: 3 })),
    (e) => {
      assert.ok(e instanceof Anthropic.BadRequestError, `${e.constructor.name}: ${e.message}`);
      assert.equal(e.status, 400);
      assert.equal(e.error?.error?.type, 'invalid_request_error');
      assert.match(e.error?.error?.message, /^temperature/);
      return true;
    });
  // A streamed request is refused the same way, before any event.
  await assert.rejects(
    streamAll({ ...(await greedy()), model: 'no-such-model' }),
    (e) => e instanceof Anthropic.NotFoundError || assert.fail(`${e.constructor.name}: ${e.message}`));
});

test('keys and aliases: x-api-key and Bearer auth, wrong key is AuthenticationError', async () => {
  const ref = await referenceMessage();
  // As Claude Code with ANTHROPIC_AUTH_TOKEN: the key as a Bearer token, no x-api-key; and a
  // model name of the agent's own, mapped by --model-alias.
  const bearer = anthropic({ apiKey: null, authToken: API_KEY });
  const m = await bearer.messages.create({ ...(await greedy()), model: MODEL_ALIAS });
  assert.equal(textOf(m), textOf(ref));
  const counted = await bearer.messages.countTokens({
    model: MODEL_ALIAS, system: SYSTEM, messages: [{ role: 'user', content: USER }],
  });
  assert.equal(counted.input_tokens, ref.usage.input_tokens);

  for (const wrong of [anthropic({ apiKey: 'sk-ant-wrong' }),
    anthropic({ apiKey: null, authToken: 'sk-ant-wrong' })]) {
    await assert.rejects(wrong.messages.create(await greedy()), (e) => {
      assert.ok(e instanceof Anthropic.AuthenticationError, `${e.constructor.name}: ${e.message}`);
      assert.equal(e.status, 401);
      assert.equal(e.error?.type, 'error');
      assert.equal(e.error?.error?.type, 'authentication_error');
      return true;
    });
  }
});
