// Exits 1 unless every package that DIR/package-lock.json pins (DIR: the first argument) is
// installed in DIR/node_modules at the locked version. One checker for the node test folders
// (tests/sdk, tests/page, tests/deploy): scripts/setup.sh runs `npm ci` in one only when this
// fails, so a machine already set up needs no network, and the sdk and page test scripts run it
// first so that a stale node_modules fails them instead of testing other package versions.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

const dir = process.argv[2] ?? '.';
const major = Number(process.versions.node.split('.')[0]);
if (major < 18) {
  console.error(`node ${process.versions.node} is too old for the pinned test packages (need >= 18)`);
  process.exit(1);
}
const lock = JSON.parse(readFileSync(join(dir, 'package-lock.json'), 'utf8'));
const problems = [];
for (const [path, entry] of Object.entries(lock.packages ?? {})) {
  if (path === '' || entry.link) continue;
  let installed;
  try {
    installed = JSON.parse(readFileSync(join(dir, path, 'package.json'), 'utf8')).version;
  } catch {
    if (entry.optional || entry.peer) continue;
    problems.push(`${path}: not installed`);
    continue;
  }
  if (installed !== entry.version) {
    problems.push(`${path}: ${installed} installed, ${entry.version} locked`);
  }
}
if (problems.length > 0) {
  console.error(problems.join('\n'));
  process.exit(1);
}
