// The official `openai` node client against the gateway's OpenAI API (/v1/chat/completions,
// /v1/models): answers, streams, usage, stop strings, tools in the request, errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import {
  MODEL_ALIAS, SYSTEM, USER, assertNoToolMarkup, modelId, openai, stopStringFrom,
} from './common.mjs';

const MAX_TOKENS = 24;
const client = openai();

const messages = [{ role: 'system', content: SYSTEM }, { role: 'user', content: USER }];
const greedy = async (extra = {}) => ({
  model: await modelId(), messages, max_tokens: MAX_TOKENS, temperature: 0, ...extra,
});

// Reads a stream to the end: the chunks, the concatenated content, and the one usage chunk.
async function collect(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  const content = chunks.flatMap((c) => c.choices).map((c) => c.delta?.content ?? '').join('');
  return { chunks, content };
}

function assertUsage(usage, maxTokens) {
  assert.ok(Number.isInteger(usage.prompt_tokens) && usage.prompt_tokens > 0, JSON.stringify(usage));
  assert.ok(Number.isInteger(usage.completion_tokens) && usage.completion_tokens >= 1 &&
    usage.completion_tokens <= maxTokens, JSON.stringify(usage));
  assert.equal(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
}

let reference;  // the non-streamed greedy answer, shared by the tests below
async function referenceAnswer() {
  reference ??= await client.chat.completions.create(await greedy());
  return reference;
}

test('models.list names the served model', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.ok(ids.includes(await modelId()), JSON.stringify(ids));
});

test('chat non-streaming: one choice, content, consistent usage', async () => {
  const r = await referenceAnswer();
  assert.equal(r.object, 'chat.completion');
  assert.match(r.id, /^chatcmpl-/);
  assert.equal(r.model, await modelId());
  assert.equal(r.choices.length, 1);
  const [choice] = r.choices;
  assert.equal(choice.index, 0);
  assert.equal(choice.message.role, 'assistant');
  assert.equal(typeof choice.message.content, 'string');
  assert.ok(choice.message.content.length > 0);
  assertNoToolMarkup(choice.message.content, 'content');
  assert.ok(['stop', 'length'].includes(choice.finish_reason), choice.finish_reason);
  assertUsage(r.usage, MAX_TOKENS);
  // `length` means the budget was used up exactly.
  if (choice.finish_reason === 'length') assert.equal(r.usage.completion_tokens, MAX_TOKENS);
  assert.equal(r.usage.prompt_tokens_details?.cached_tokens, 0);
  // Greedy decoding is deterministic: the same request gives the same answer.
  const again = await client.chat.completions.create(await greedy());
  assert.equal(again.choices[0].message.content, choice.message.content);
  assert.deepEqual(again.usage, r.usage);
});

test('chat streaming with include_usage: one usage chunk, same text as non-streamed', async () => {
  const ref = await referenceAnswer();
  const stream = await client.chat.completions.create(
    await greedy({ stream: true, stream_options: { include_usage: true } }));
  const { chunks, content } = await collect(stream);
  assert.ok(chunks.length >= 3, `${chunks.length} chunks`);
  for (const c of chunks) {
    assert.equal(c.object, 'chat.completion.chunk');
    assert.equal(c.id, chunks[0].id);
  }
  const withUsage = chunks.filter((c) => c.usage != null);
  assert.equal(withUsage.length, 1, 'exactly one chunk carries usage');
  const last = chunks[chunks.length - 1];
  assert.equal(withUsage[0], last, 'the usage chunk is the last one');
  assert.deepEqual(last.choices, []);
  assert.deepEqual(last.usage, ref.usage);
  // Every other chunk has one choice; the last of them carries the finish reason.
  const choiceChunks = chunks.slice(0, -1);
  for (const c of choiceChunks) assert.equal(c.choices.length, 1, JSON.stringify(c));
  assert.equal(choiceChunks[0].choices[0].delta.role, 'assistant');
  const finishes = choiceChunks.map((c) => c.choices[0].finish_reason).filter((f) => f != null);
  assert.deepEqual(finishes, [ref.choices[0].finish_reason]);
  assert.equal(content, ref.choices[0].message.content);
});

test('stop: the answer ends before the stop string and never contains it', async () => {
  // A longer greedy answer to pick the stop string from, so that it really occurs.
  const long = await client.chat.completions.create(await greedy({ max_tokens: 40 }));
  const text = long.choices[0].message.content;
  const { stop, before } = stopStringFrom(text);

  const r = await client.chat.completions.create(await greedy({ max_tokens: 40, stop: [stop] }));
  assert.equal(r.choices[0].finish_reason, 'stop');
  assert.ok(!r.choices[0].message.content.includes(stop));
  assert.equal(r.choices[0].message.content, before);
  assert.ok(r.usage.completion_tokens <= long.usage.completion_tokens);

  // Streamed, the text that could still begin the stop string is held back, never sent.
  const stream = await client.chat.completions.create(
    await greedy({ max_tokens: 40, stop: stop, stream: true, stream_options: { include_usage: true } }));
  const { chunks, content } = await collect(stream);
  assert.ok(!content.includes(stop));
  assert.equal(content, before);
  const finishes = chunks.flatMap((c) => c.choices).map((c) => c.finish_reason).filter((f) => f != null);
  assert.deepEqual(finishes, ['stop']);
});

const TOOLS = [{
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'Current weather for a city.',
    parameters: {
      type: 'object',
      properties: { city: { type: 'string' }, unit: { type: 'string', enum: ['c', 'f'] } },
      required: ['city'],
    },
  },
}];

function assertToolAnswerShape(message, finishReason) {
  assert.equal(message.role, 'assistant');
  if (message.tool_calls?.length) {
    assert.equal(finishReason, 'tool_calls');
    for (const call of message.tool_calls) {
      assert.equal(call.type, 'function');
      assert.equal(typeof call.id, 'string');
      assert.ok(call.id.length > 0);
      assert.equal(call.function.name, 'get_weather');
      assert.doesNotThrow(() => JSON.parse(call.function.arguments), call.function.arguments);
    }
  } else {
    assert.ok(['stop', 'length'].includes(finishReason), finishReason);
    assert.equal(typeof message.content, 'string');
  }
  if (message.content != null) assertNoToolMarkup(message.content, 'content');
}

test('tools in the request: accepted, encoded into the prompt, a valid answer', async () => {
  const plain = await referenceAnswer();
  const r = await client.chat.completions.create(await greedy({ tools: TOOLS, tool_choice: 'auto' }));
  assertToolAnswerShape(r.choices[0].message, r.choices[0].finish_reason);
  assertUsage(r.usage, MAX_TOKENS);
  // The tool definitions are part of the prompt the model sees.
  assert.ok(r.usage.prompt_tokens > plain.usage.prompt_tokens,
    `${r.usage.prompt_tokens} prompt tokens with tools, ${plain.usage.prompt_tokens} without`);

  // Streamed: the same content, and tool-call deltas (if any) rebuild the same calls.
  const stream = await client.chat.completions.create(
    await greedy({ tools: TOOLS, tool_choice: 'auto', stream: true }));
  const { chunks, content } = await collect(stream);
  assert.equal(content, r.choices[0].message.content ?? '');
  const calls = [];
  for (const d of chunks.flatMap((c) => c.choices).map((c) => c.delta)) {
    for (const t of d.tool_calls ?? []) {
      // The first delta of a call carries its id and name; later ones only argument text.
      if (calls[t.index] === undefined) {
        assert.ok(typeof t.id === 'string' && t.id.length > 0, JSON.stringify(t));
        calls[t.index] = { name: t.function?.name, arguments: '' };
      }
      calls[t.index].arguments += t.function?.arguments ?? '';
    }
  }
  assert.deepEqual(calls, (r.choices[0].message.tool_calls ?? []).map(
    (c) => ({ name: c.function.name, arguments: c.function.arguments })));

  // A finished tool round trip (assistant tool_calls + tool result) is a valid conversation.
  const followUp = await client.chat.completions.create(await greedy({
    tools: TOOLS,
    messages: [
      ...messages,
      { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function',
        function: { name: 'get_weather', arguments: '{"city":"Lyon"}' } }] },
      { role: 'tool', tool_call_id: 'call_1', content: '{"temp_c": 21}' },
    ],
  }));
  assertToolAnswerShape(followUp.choices[0].message, followUp.choices[0].finish_reason);
  assert.ok(followUp.usage.prompt_tokens > r.usage.prompt_tokens);
});

test('errors: unknown model is NotFoundError, a bad field is BadRequestError naming it', async () => {
  await assert.rejects(
    client.chat.completions.create({ ...(await greedy()), model: 'no-such-model' }),
    (e) => {
      assert.ok(e instanceof OpenAI.NotFoundError, `${e.constructor.name}: ${e.message}`);
      assert.equal(e.status, 404);
      return true;
    });
  await assert.rejects(
    client.chat.completions.create(await greedy({ temperature: 5 })),
    (e) => {
      assert.ok(e instanceof OpenAI.BadRequestError, `${e.constructor.name}: ${e.message}`);
      assert.equal(e.status, 400);
      assert.equal(e.param, 'temperature');
      assert.equal(e.type, 'invalid_request_error');
      return true;
    });
  await assert.rejects(
    client.chat.completions.create(await greedy({ messages: [{ role: 'wizard', content: 'hi' }] })),
    (e) => {
      assert.ok(e instanceof OpenAI.BadRequestError, `${e.constructor.name}: ${e.message}`);
      assert.equal(e.param, 'messages[0].role');
      return true;
    });
});

test('keys and aliases: the key as a Bearer token, a wrong key is AuthenticationError', async () => {
  const ref = await referenceAnswer();
  // An agent configured with its own model name (--model-alias NAME=MODEL) gets the served model.
  const aliased = await client.chat.completions.create({ ...(await greedy()), model: MODEL_ALIAS });
  assert.equal(aliased.choices[0].message.content, ref.choices[0].message.content);

  await assert.rejects(
    openai({ apiKey: 'sk-not-a-key-of-this-cluster' }).chat.completions.create(await greedy()),
    (e) => {
      assert.ok(e instanceof OpenAI.AuthenticationError, `${e.constructor.name}: ${e.message}`);
      assert.equal(e.status, 401);
      assert.equal(e.code, 'invalid_api_key');
      return true;
    });
  await assert.rejects(
    openai({ apiKey: 'sk-not-a-key-of-this-cluster' }).models.list(),
    (e) => e instanceof OpenAI.AuthenticationError || assert.fail(`${e.constructor.name}: ${e.message}`));
});
