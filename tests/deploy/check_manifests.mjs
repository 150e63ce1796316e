// Offline checks of the Kubernetes manifests in deploy/k8s (ctest: deploy_manifests_test).
//
//   node tests/deploy/check_manifests.mjs --k8s deploy/k8s --bin-dir build
//
// For every overlay: `kubectl kustomize` renders it; every object validates against the
// Kubernetes (and prometheus-operator) schemas of the pinned kubernetes-models packages; every
// container's args and --config file use only flags its binary's --help lists; probe ports,
// containerPorts and Service targetPorts are ports the binary listens on by those args; every
// address in the args names a Service (or the pod's own name / IP) and a port that reaches the
// right container port. Then it breaks a rendered overlay on purpose (a misspelled flag, a
// probe on the wrong port, a wrong Service port in an address) and requires each to be caught,
// so the checks cannot silently go blind. Exits 1 with one line per problem.
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';

function fatal(msg) {
  console.error(`check_manifests: ${msg}`);
  process.exit(1);
}

// A missing package is a failure, never a skip: scripts/setup.sh installs them.
let YAML, appsV1, coreV1, autoscalingV2, policyV1, monitoringV1;
try {
  YAML = await import('yaml');
  appsV1 = await import('kubernetes-models/apps/v1');
  coreV1 = await import('kubernetes-models/v1');
  autoscalingV2 = await import('kubernetes-models/autoscaling/v2');
  policyV1 = await import('kubernetes-models/policy/v1');
  monitoringV1 = await import('@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1');
} catch (e) {
  fatal(`cannot load the schema packages (run scripts/setup.sh: npm ci in tests/deploy): ${e.message}`);
}

const args = process.argv.slice(2);
function opt(name, dflt) {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
}
const k8sDir = resolve(opt('--k8s', 'deploy/k8s'));
const binDir = resolve(opt('--bin-dir', 'build'));

const MODELS = {
  'apps/v1/Deployment': appsV1.Deployment,
  'apps/v1/StatefulSet': appsV1.StatefulSet,
  'v1/Service': coreV1.Service,
  'v1/ConfigMap': coreV1.ConfigMap,
  'v1/Secret': coreV1.Secret,
  'v1/PersistentVolumeClaim': coreV1.PersistentVolumeClaim,
  'v1/Namespace': coreV1.Namespace,
  'autoscaling/v2/HorizontalPodAutoscaler': autoscalingV2.HorizontalPodAutoscaler,
  'policy/v1/PodDisruptionBudget': policyV1.PodDisruptionBudget,
  'monitoring.coreos.com/v1/PodMonitor': monitoringV1.PodMonitor,
  'monitoring.coreos.com/v1/ServiceMonitor': monitoringV1.ServiceMonitor,
};

// The binary that a container's command names, found in the build tree as
// <bin-dir>/<service>/expertmesh-<service>.
const helpCache = new Map();
function binaryFlags(binName) {
  if (helpCache.has(binName)) return helpCache.get(binName);
  const service = binName.replace(/^expertmesh-/, '');
  const path = join(binDir, service, binName);
  if (!existsSync(path)) fatal(`binary ${path} is missing (build it: scripts/build.sh release ${binName})`);
  let out;
  try {
    out = execFileSync(path, ['--help'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    out = `${e.stdout ?? ''}${e.stderr ?? ''}`;
  }
  const flags = new Set();
  for (const m of out.matchAll(/^\s{2}--([a-z0-9-]+)/gm)) flags.add(m[1]);
  if (!flags.has('listen')) fatal(`${path} --help lists no --listen flag; cannot read its flags from: ${out.slice(0, 300)}`);
  helpCache.set(binName, flags);
  return flags;
}

function render(overlay) {
  try {
    return execFileSync('kubectl', ['kustomize', overlay], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    if (e.code === 'ENOENT') fatal('kubectl is not installed (scripts/setup.sh installs it)');
    fatal(`kubectl kustomize ${overlay} failed: ${e.stderr || e.message}`);
  }
}

function parseDocs(text) {
  return YAML.parseAllDocuments(text).map((d) => d.toJS()).filter((o) => o);
}

function selects(selector, labels) {
  return Object.entries(selector ?? {}).every(([k, v]) => labels?.[k] === v);
}

// key = value lines or one JSON object, as the services' --config reads them.
function parseConfig(text) {
  const t = text.trim();
  if (t.startsWith('{')) return JSON.parse(t);
  const out = {};
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const eq = line.indexOf('=');
    if (eq < 0) throw new Error(`expected key = value: '${line}'`);
    out[line.slice(0, eq).trim().replace(/^--/, '')] = line.slice(eq + 1).trim().replace(/^"(.*)"$/, '$1');
  }
  return out;
}

function hostPort(value) {
  const i = value.lastIndexOf(':');
  if (i < 0) return null;
  const port = Number(value.slice(i + 1));
  return Number.isInteger(port) ? { host: value.slice(0, i), port } : null;
}

function checkObjects(objects, where) {
  const errors = [];
  const err = (obj, msg) => errors.push(`${where}: ${obj.kind}/${obj.metadata?.name}: ${msg}`);

  for (const obj of objects) {
    const Model = MODELS[`${obj.apiVersion}/${obj.kind}`];
    if (!Model) {
      err(obj, `no schema for ${obj.apiVersion} ${obj.kind} (add it to MODELS)`);
      continue;
    }
    // kustomize wraps long base64 values in Secrets at 70 columns; the API server's decoder skips
    // the newlines, the schema's "byte" format does not, so compare what the server would.
    const candidate = obj.kind === 'Secret' && obj.data
      ? { ...obj, data: Object.fromEntries(Object.entries(obj.data).map(([k, v]) => [k, String(v).replace(/\s+/g, '')])) }
      : obj;
    try {
      new Model(candidate).validate();
    } catch (e) {
      err(obj, `schema: ${e.message}`);
    }
  }

  const byKind = (k) => objects.filter((o) => o.kind === k);
  const configMaps = new Map(byKind('ConfigMap').map((o) => [o.metadata.name, o]));
  const secrets = new Map(byKind('Secret').map((o) => [o.metadata.name, o]));
  const pvcs = new Set(byKind('PersistentVolumeClaim').map((o) => o.metadata.name));
  const services = new Map(byKind('Service').map((o) => [o.metadata.name, o]));
  const workloads = [...byKind('Deployment'), ...byKind('StatefulSet')];

  // Per workload: what its (single expertmesh) container listens on, by name and number.
  const listening = new Map();
  for (const w of workloads) {
    const pod = w.spec?.template?.spec ?? {};
    const claimTemplates = new Set((w.spec?.volumeClaimTemplates ?? []).map((c) => c.metadata?.name));
    for (const vol of pod.volumes ?? []) {
      if (vol.configMap && !configMaps.has(vol.configMap.name)) err(w, `volume ${vol.name}: no ConfigMap ${vol.configMap.name}`);
      if (vol.secret && !secrets.has(vol.secret.secretName)) err(w, `volume ${vol.name}: no Secret ${vol.secret.secretName}`);
      if (vol.persistentVolumeClaim && !pvcs.has(vol.persistentVolumeClaim.claimName)) {
        err(w, `volume ${vol.name}: no PersistentVolumeClaim ${vol.persistentVolumeClaim.claimName}`);
      }
    }
    for (const c of pod.containers ?? []) {
      const cwhere = (msg) => err(w, `container ${c.name}: ${msg}`);
      const bin = basename(c.command?.[0] ?? '');
      if (!bin.startsWith('expertmesh-')) {
        cwhere(`command ${JSON.stringify(c.command)} does not run an expertmesh binary`);
        continue;
      }
      const flags = binaryFlags(bin);
      const env = new Map((c.env ?? []).map((e) => [e.name, e]));
      const mounts = c.volumeMounts ?? [];
      const mountFor = (path) =>
        mounts.filter((m) => path === m.mountPath || path.startsWith(`${m.mountPath}/`))
          .sort((a, b) => b.mountPath.length - a.mountPath.length)[0];
      const volumeOf = (m) => (pod.volumes ?? []).find((v) => v.name === m.name);
      for (const m of mounts) {
        if (!volumeOf(m) && !claimTemplates.has(m.name)) cwhere(`volumeMount ${m.name}: no such volume`);
      }
      // A file that must come from a ConfigMap / Secret key: returns its text when it does.
      const fileText = (flag, path) => {
        const m = mountFor(path);
        if (!m) return cwhere(`--${flag}=${path}: no volume is mounted there`);
        const vol = volumeOf(m);
        const key = path.slice(m.mountPath.length + 1);
        const src = vol?.configMap ? configMaps.get(vol.configMap.name) : vol?.secret ? secrets.get(vol.secret.secretName) : null;
        if (!src) return undefined;
        const data = src.data?.[key] !== undefined && vol.secret ? Buffer.from(src.data[key], 'base64').toString() : src.data?.[key] ?? src.stringData?.[key];
        if (data === undefined) return cwhere(`--${flag}=${path}: ${src.kind} ${src.metadata.name} has no key ${key}`);
        return data;
      };

      const values = {};
      const cli = [];
      for (const a of c.args ?? []) {
        const m = /^--([^=]+)(?:=(.*))?$/.exec(a);
        if (!m) { cwhere(`argument '${a}' is not --flag=value`); continue; }
        if (m[1] !== 'config' && !flags.has(m[1])) cwhere(`--${m[1]} is not a flag of ${bin} (its --help)`);
        const value = (m[2] ?? 'true').replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (all, name) => {
          if (!env.has(name)) cwhere(`'${a}' uses $(${name}), which the container's env does not define`);
          return all;
        });
        cli.push([m[1], value]);
      }
      for (const [name, value] of cli) {
        if (name !== 'config') continue;
        const text = fileText('config', value);
        if (text === undefined) continue;
        let conf;
        try { conf = parseConfig(text); } catch (e) { cwhere(`--config=${value}: ${e.message}`); continue; }
        for (const [k, v] of Object.entries(conf)) {
          if (!flags.has(k) || k === 'config') cwhere(`--config=${value}: key '${k}' is not a flag of ${bin}`);
          values[k] = String(v);
        }
      }
      for (const [name, value] of cli) if (name !== 'config') values[name] = value;
      for (const flag of ['api-keys-file']) if (values[flag]) fileText(flag, values[flag]);
      for (const flag of ['model', 'disk-dir', 'state-dir']) {
        if (values[flag] && !mountFor(values[flag])) cwhere(`--${flag}=${values[flag]}: no volume is mounted there`);
      }

      // The ports this binary listens on by its flags; a loopback-only one is unreachable.
      const ports = new Map();
      const listenFlag = (flag) => {
        const hp = values[flag] ? hostPort(values[flag]) : null;
        if (!hp || hp.port === 0) return cwhere(`--${flag} must be HOST:PORT with a fixed port (got ${values[flag] ?? 'the default'})`);
        if (hp.host.startsWith('127.') || hp.host === 'localhost') cwhere(`--${flag}=${values[flag]} listens on loopback only`);
        ports.set(hp.port, flag);
      };
      listenFlag('listen');
      listenFlag('metrics-listen');
      if (flags.has('http-port')) {
        const port = Number(values['http-port'] ?? 8000);
        const host = values['http-host'] ?? '127.0.0.1';
        if (host.startsWith('127.') || host === 'localhost') cwhere(`--http-host=${host} listens on loopback only`);
        ports.set(port, 'http-port');
      }
      const named = new Map();
      for (const p of c.ports ?? []) {
        if (!ports.has(p.containerPort)) cwhere(`containerPort ${p.name ?? ''} ${p.containerPort} is no port the args make ${bin} listen on (${[...ports.keys()].join(', ')})`);
        if (p.name) named.set(p.name, p.containerPort);
      }
      const grpcPort = hostPort(values.listen ?? '')?.port;
      const resolvePort = (p) => (typeof p === 'number' ? p : named.get(p));
      for (const kind of ['readinessProbe', 'livenessProbe', 'startupProbe']) {
        const probe = c[kind];
        if (!probe) continue;
        if (probe.grpc && probe.grpc.port !== grpcPort) cwhere(`${kind}: grpc port ${probe.grpc.port} is not the --listen port ${grpcPort}`);
        const httpPort = probe.httpGet ? resolvePort(probe.httpGet.port) : undefined;
        if (probe.httpGet && !ports.has(httpPort)) cwhere(`${kind}: httpGet port ${probe.httpGet.port} is not a listening port`);
        if (probe.tcpSocket && !ports.has(resolvePort(probe.tcpSocket.port))) cwhere(`${kind}: tcpSocket port ${probe.tcpSocket.port} is not a listening port`);
      }
      listening.set(w, { container: c, values, ports, named, grpcPort, env, cwhere });
    }
  }

  // Services: every targetPort reaches a port the selected container listens on.
  const backends = (svc) => workloads.filter((w) => selects(svc.spec?.selector, w.spec?.template?.metadata?.labels));
  for (const svc of services.values()) {
    const targets = backends(svc);
    if (targets.length === 0) { err(svc, `selector ${JSON.stringify(svc.spec?.selector)} matches no workload`); continue; }
    for (const sp of svc.spec?.ports ?? []) {
      for (const w of targets) {
        const l = listening.get(w);
        if (!l) continue;
        const tp = sp.targetPort ?? sp.port;
        const port = typeof tp === 'number' ? tp : l.named.get(tp);
        if (port === undefined || !l.ports.has(port)) err(svc, `port ${sp.name ?? sp.port}: targetPort ${tp} is no port ${w.metadata.name} listens on`);
      }
    }
  }

  // Addresses in args: a Service name, `$(POD_NAME).<headless service>` or `$(POD_IP)`.
  const grpcPortOf = (w) => listening.get(w)?.grpcPort;
  for (const [w, l] of listening) {
    for (const flag of ['router', 'kv-store', 'attention-worker', 'advertise']) {
      const value = l.values[flag];
      if (!value) continue;
      const hp = hostPort(value);
      if (!hp) { l.cwhere(`--${flag}=${value} is not HOST:PORT`); continue; }
      const own = /^\$\(([A-Za-z_]+)\)(?:\.(.+))?$/.exec(hp.host);
      if (own) {
        if (flag !== 'advertise') { l.cwhere(`--${flag}=${value}: only --advertise may name the pod itself`); continue; }
        const field = l.env.get(own[1])?.valueFrom?.fieldRef?.fieldPath;
        if (hp.port !== l.grpcPort) l.cwhere(`--advertise=${value}: port ${hp.port} is not the --listen port ${l.grpcPort}`);
        if (!own[2]) {
          if (field !== 'status.podIP') l.cwhere(`--advertise=${value}: $(${own[1]}) is not the pod IP (fieldRef status.podIP)`);
        } else {
          const svc = services.get(own[2]);
          if (field !== 'metadata.name') l.cwhere(`--advertise=${value}: $(${own[1]}) is not the pod name (fieldRef metadata.name)`);
          if (w.kind !== 'StatefulSet' || w.spec.serviceName !== own[2]) l.cwhere(`--advertise=${value}: pod DNS names need a StatefulSet whose serviceName is ${own[2]}`);
          if (!svc || svc.spec?.clusterIP !== 'None') l.cwhere(`--advertise=${value}: ${own[2]} is not a headless Service`);
          else if (!backends(svc).includes(w)) l.cwhere(`--advertise=${value}: Service ${own[2]} does not select this pod`);
        }
        continue;
      }
      if (flag === 'advertise') { l.cwhere(`--advertise=${value}: use the pod's IP or StatefulSet DNS name, not a shared name`); continue; }
      const svc = services.get(hp.host);
      if (!svc) { l.cwhere(`--${flag}=${value}: no Service named ${hp.host}`); continue; }
      const want = flag; // the Service must front the binary the flag is about
      const targets = backends(svc).filter((t) => basename(listening.get(t)?.container.command?.[0] ?? '') === `expertmesh-${want}`);
      if (targets.length === 0) { l.cwhere(`--${flag}=${value}: Service ${hp.host} does not select expertmesh-${want} pods`); continue; }
      const headless = svc.spec?.clusterIP === 'None';
      for (const t of targets) {
        let reached;
        if (headless) reached = hp.port;
        else {
          const sp = (svc.spec?.ports ?? []).find((p) => p.port === hp.port);
          if (!sp) { l.cwhere(`--${flag}=${value}: Service ${hp.host} has no port ${hp.port}`); break; }
          const tp = sp.targetPort ?? sp.port;
          reached = typeof tp === 'number' ? tp : listening.get(t).named.get(tp);
        }
        if (reached !== grpcPortOf(t)) l.cwhere(`--${flag}=${value}: reaches port ${reached} of ${t.metadata.name}, whose gRPC port is ${grpcPortOf(t)}`);
      }
    }
  }

  for (const hpa of byKind('HorizontalPodAutoscaler')) {
    const ref = hpa.spec?.scaleTargetRef ?? {};
    if (!workloads.some((w) => w.kind === ref.kind && w.metadata.name === ref.name)) err(hpa, `scaleTargetRef ${ref.kind}/${ref.name} is not rendered`);
  }
  for (const pdb of byKind('PodDisruptionBudget')) {
    if (!workloads.some((w) => selects(pdb.spec?.selector?.matchLabels, w.spec?.template?.metadata?.labels))) err(pdb, 'selector matches no workload');
  }
  for (const pm of byKind('PodMonitor')) {
    const port = pm.spec?.podMetricsEndpoints?.[0]?.port;
    const scraped = workloads.filter((w) => selects(pm.spec?.selector?.matchLabels, w.spec?.template?.metadata?.labels));
    if (scraped.length !== workloads.length) err(pm, `selects ${scraped.length} of ${workloads.length} workloads`);
    for (const w of scraped) {
      const l = listening.get(w);
      const mp = l && hostPort(l.values['metrics-listen'] ?? '')?.port;
      if (l && l.named.get(port) !== mp) err(pm, `port ${port} of ${w.metadata.name} is not its --metrics-listen port ${mp}`);
    }
  }
  return errors;
}

const overlaysDir = join(k8sDir, 'overlays');
if (!existsSync(overlaysDir)) fatal(`${overlaysDir} does not exist`);
const overlays = readdirSync(overlaysDir, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name).sort();
if (!overlays.includes('local') || !overlays.includes('production')) fatal(`overlays ${overlays.join(', ')}: need local and production`);

let failures = [];
let rendered = null;
for (const name of overlays) {
  const objects = parseDocs(render(join(overlaysDir, name)));
  const kinds = new Set(objects.map((o) => o.kind));
  for (const k of ['Deployment', 'StatefulSet', 'Service', 'HorizontalPodAutoscaler', 'PodDisruptionBudget', 'ConfigMap', 'Secret', 'PodMonitor']) {
    if (!kinds.has(k)) failures.push(`${name}: renders no ${k}`);
  }
  const errors = checkObjects(objects, name);
  failures.push(...errors);
  console.log(`${name}: ${objects.length} objects, ${errors.length} problems`);
  if (name === 'local') rendered = objects;
}

// Each mutation must be caught, or the checks above have gone blind.
const find = (objs, kind, name) => objs.find((o) => o.kind === kind && o.metadata.name === name);
const container = (objs, kind, name) => find(objs, kind, name).spec.template.spec.containers[0];
const mutations = [
  ['a misspelled flag', (o) => { const c = container(o, 'StatefulSet', 'expert-worker'); c.args = c.args.map((a) => a.replace('--metrics-listen=', '--metric-listen=')); }],
  ['a probe on the wrong port', (o) => { container(o, 'Deployment', 'router').readinessProbe.grpc.port = 50052; }],
  ['a containerPort nothing listens on', (o) => { container(o, 'Deployment', 'gateway').ports[1].containerPort = 8080; }],
  ['an address with the wrong Service port', (o) => { const c = container(o, 'Deployment', 'attention-worker'); c.args = c.args.map((a) => a.replace(/^--router=router:\d+/, '--router=router:50099')); }],
  ['an address naming no Service', (o) => { const c = container(o, 'Deployment', 'gateway'); c.args = c.args.map((a) => a.replace(/^--router=router:/, '--router=routr:')); }],
  ['a Service targetPort nothing listens on', (o) => { find(o, 'Service', 'router').spec.ports[0].targetPort = 50052; }],
  ['a schema violation', (o) => { find(o, 'StatefulSet', 'expert-worker').spec.replicas = 'two'; }],
];
for (const [what, mutate] of mutations) {
  const copy = structuredClone(rendered);
  mutate(copy);
  const caught = checkObjects(copy, `mutated (${what})`);
  if (process.env.EM_DEPLOY_CHECK_VERBOSE) console.log(caught.join("\n"));
  if (caught.length === 0) failures.push(`self-check: ${what} in the local overlay was not caught`);
}
console.log(`self-check: ${mutations.length} deliberate breakages tried`);

if (failures.length > 0) {
  console.error(failures.join('\n'));
  process.exit(1);
}
console.log('all overlays render, validate and agree with the binaries');
