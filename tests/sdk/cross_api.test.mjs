// One cluster, two APIs: the same greedy request (temperature 0, same messages, same max tokens)
// through the OpenAI and the Anthropic clients is the same prompt and the same answer.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SYSTEM, USER, anthropic, modelId, openai } from './common.mjs';

const MAX_TOKENS = 32;
const oai = openai();
const claude = anthropic();

test('the same greedy request gives the same text through both APIs', async () => {
  const model = await modelId();
  const o = await oai.chat.completions.create({
    model, max_tokens: MAX_TOKENS, temperature: 0,
    messages: [{ role: 'system', content: SYSTEM }, { role: 'user', content: USER }],
  });
  const a = await claude.messages.create({
    model, max_tokens: MAX_TOKENS, temperature: 0, system: SYSTEM,
    messages: [{ role: 'user', content: USER }],
  });
  const aText = a.content.filter((b) => b.type === 'text').map((b) => b.text).join('');
  assert.ok(aText.length > 0);
  assert.equal(o.choices[0].message.content, aText);
  assert.equal(o.usage.prompt_tokens, a.usage.input_tokens);
  assert.equal(o.usage.completion_tokens, a.usage.output_tokens);
  const finish = { stop: 'end_turn', length: 'max_tokens' };
  assert.equal(finish[o.choices[0].finish_reason], a.stop_reason);

  // Streamed through both, still the same text.
  let oStreamed = '';
  const os = await oai.chat.completions.create({
    model, max_tokens: MAX_TOKENS, temperature: 0, stream: true,
    messages: [{ role: 'system', content: SYSTEM }, { role: 'user', content: USER }],
  });
  for await (const c of os) oStreamed += c.choices[0]?.delta?.content ?? '';
  const as = claude.messages.stream({
    model, max_tokens: MAX_TOKENS, temperature: 0, system: SYSTEM,
    messages: [{ role: 'user', content: USER }],
  });
  let aStreamed = '';
  as.on('text', (delta) => { aStreamed += delta; });
  await as.finalMessage();
  assert.equal(oStreamed, aText);
  assert.equal(aStreamed, aText);
});

test('thinking on through both APIs: the same reasoning and the same answer', async () => {
  // OpenAI reasoning_effort "high" and Anthropic adaptive thinking are both V4 thinking mode with
  // effort high (docs/gateway.md), so the prompts and the greedy answers match.
  const model = await modelId();
  const o = await oai.chat.completions.create({
    model, max_tokens: MAX_TOKENS, temperature: 0, reasoning_effort: 'high',
    messages: [{ role: 'user', content: USER }],
  });
  const a = await claude.messages.create({
    model, max_tokens: MAX_TOKENS, temperature: 0, thinking: { type: 'adaptive' },
    messages: [{ role: 'user', content: USER }],
  });
  assert.equal(o.usage.prompt_tokens, a.usage.input_tokens);
  const thinking = a.content.filter((b) => b.type === 'thinking').map((b) => b.thinking).join('');
  const text = a.content.filter((b) => b.type === 'text').map((b) => b.text).join('');
  assert.ok(thinking.length > 0);
  assert.equal(o.choices[0].message.reasoning_content, thinking);
  assert.equal(o.choices[0].message.content ?? '', text);
});
