// A real fanout stack for the integration tests: scripts/stack.sh (Mosquitto + N instances of
// target/release/fanout + nginx, from the project's own configs) on free loopback ports, HS256
// test tokens signed with node:crypto, and waits on signals (events, /readyz), not sleeps.
import { execFile, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, '../../..');
export const SECRET = 'fanout-client-integration-secret';

export function fanoutBin() {
  const bin = process.env.FANOUT_BIN || path.join(ROOT, 'target/release/fanout');
  if (!fs.existsSync(bin)) {
    throw new Error(`no fanout binary at ${bin}: run \`cargo build --release\` in ${ROOT} (or set FANOUT_BIN)`);
  }
  return bin;
}

const b64 = (x) => Buffer.from(typeof x === 'string' ? x : JSON.stringify(x)).toString('base64url');

/** An HS256 JWT for `sub`, valid for `ttl` seconds. */
export function token(sub, ttl = 3600, extra = {}) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, iat: now, exp: now + ttl, ...extra });
  const sig = crypto.createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

export function unique(prefix) {
  return prefix + crypto.randomBytes(5).toString('hex');
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Resolves when `emitter` emits `event` with arguments satisfying `pred`; rejects after `ms`. */
export function waitFor(client, event, pred = () => true, ms = 15000, what = event) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => { off(); reject(new Error(`timed out after ${ms} ms waiting for ${what}`)); }, ms);
    const off = client.on(event, (...a) => {
      if (pred(...a)) { clearTimeout(t); off(); resolve(a[0]); }
    });
  });
}

/** Polls `fn` (sync or async) every 25 ms until it is truthy; rejects after `ms`. */
export async function until(fn, ms = 15000, what = 'a condition') {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export async function httpStatus(port, p) {
  try {
    const r = await fetch(`http://127.0.0.1:${port}${p}`, { signal: AbortSignal.timeout(3000) });
    await r.arrayBuffer();
    return r.status;
  } catch {
    return 0;
  }
}

function findProgram(name) {
  for (const d of ['/usr/sbin', '/usr/bin', '/usr/local/sbin', '/usr/local/bin', '/sbin', '/bin']) {
    const p = path.join(d, name);
    if (fs.existsSync(p)) return p;
  }
  throw new Error(`${name} not found (scripts/test.sh installs it)`);
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/\) [ZX] /.test(st);
  } catch {
    return false;
  }
}

export class Stack {
  /** `scripts/stack.sh up n` on free ports with the test secret (env: extra for the instances). */
  static async up(n, env = {}) {
    const bin = fanoutBin();
    let last = '';
    for (let attempt = 0; attempt < 3; attempt++) {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fanout-js-'));
      const port = await freePort();
      const mqttPort = await freePort();
      const ports = [];
      for (let i = 0; i < n; i++) ports.push(await freePort());
      const st = new Stack(dir, port, mqttPort, ports.map((p, i) => ({ id: `n${i + 1}`, port: p })));
      try {
        await run('bash', [path.join(ROOT, 'scripts/stack.sh'), 'up', String(n)], {
          env: {
            ...process.env,
            ...env,
            STACK_DIR: dir,
            STACK_PORT: String(port),
            STACK_MQTT_PORT: String(mqttPort),
            STACK_INSTANCE_PORTS: ports.join(' '),
            STACK_JWT_SECRET: SECRET,
            FANOUT_BIN: bin,
            RUST_LOG: process.env.RUST_LOG || 'info',
          },
          timeout: 90000,
        });
        return st;
      } catch (e) {
        last = `${e.message}\n${e.stdout || ''}${e.stderr || ''}\n${st.logs()}`;
        await st.down();
      }
    }
    throw new Error(`scripts/stack.sh up ${n} failed three times:\n${last}`);
  }

  constructor(dir, port, mqttPort, instances) {
    this.dir = dir;
    this.port = port;
    this.mqttPort = mqttPort;
    this.instances = instances;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/entrypoint`;
  }

  instanceUrl(id) {
    return `ws://127.0.0.1:${this.instance(id).port}/entrypoint`;
  }

  instance(id) {
    const i = this.instances.find((x) => x.id === id);
    if (!i) throw new Error(`no instance ${id}`);
    return i;
  }

  pid(name) {
    return Number(fs.readFileSync(path.join(this.dir, `${name}.pid`), 'utf8').trim());
  }

  /** Sends `signal` to instance `id` and waits until the process is gone. */
  async kill(id, signal = 'SIGKILL') {
    const pid = this.pid(`fanout-${id}`);
    process.kill(pid, signal);
    await until(() => !alive(pid), 20000, `instance ${id} (pid ${pid}) to exit`);
  }

  /** Sends `signal` to instance `id`; for SIGSTOP, waits until the process is stopped. */
  async signal(id, signal) {
    const pid = this.pid(`fanout-${id}`);
    process.kill(pid, signal);
    if (signal === 'SIGSTOP') {
      await until(() => /\) T /.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8')), 5000, `instance ${id} stopped`);
    }
  }

  /** Kills the broker (an abrupt outage for every instance). */
  async stopBroker() {
    const pid = this.pid('mosquitto');
    process.kill(pid, 'SIGKILL');
    await until(() => !alive(pid), 10000, 'mosquitto to exit');
  }

  /** Starts the broker again on the same port; `down` stops it. */
  async startBroker() {
    const log = fs.openSync(path.join(this.dir, 'mosquitto.log'), 'a');
    const child = spawn(findProgram('mosquitto'), ['-c', path.join(this.dir, 'mosquitto.conf')], {
      stdio: ['ignore', log, log],
      detached: true,
    });
    child.unref();
    fs.writeFileSync(path.join(this.dir, 'mosquitto.pid'), String(child.pid));
    await until(() => new Promise((resolve) => {
      const s = net.connect(this.mqttPort, '127.0.0.1');
      s.once('connect', () => { s.destroy(); resolve(true); });
      s.once('error', () => resolve(false));
    }), 10000, 'mosquitto to listen again');
  }

  async ready(id) {
    return (await httpStatus(this.instance(id).port, '/readyz')) === 200;
  }

  logs() {
    let out = '';
    let files = [];
    try { files = fs.readdirSync(this.dir).filter((f) => f.endsWith('.log')).sort(); } catch { return out; }
    for (const f of files) {
      const lines = fs.readFileSync(path.join(this.dir, f), 'utf8').split('\n').slice(-40);
      out += `---- ${f} ----\n${lines.join('\n')}\n`;
    }
    return out;
  }

  async down() {
    try {
      await run('bash', [path.join(ROOT, 'scripts/stack.sh'), 'down'], {
        env: { ...process.env, STACK_DIR: this.dir },
        timeout: 60000,
      });
    } catch { /* best effort */ }
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * A TCP proxy in front of `port`. `blackhole()` makes every connection open at that moment
 * half-dead: what the client sends still reaches the server, what the server answers is
 * dropped (acks and pongs lost on the way back). Connections made later work normally.
 */
export async function proxy(port) {
  const conns = new Set();
  const server = net.createServer((down) => {
    const up = net.connect(port, '127.0.0.1');
    const c = { down, up, blackholed: false };
    conns.add(c);
    down.pipe(up);
    up.on('data', (d) => { if (!c.blackholed) down.write(d); });
    const end = () => { conns.delete(c); down.destroy(); up.destroy(); };
    down.on('close', end);
    up.on('close', end);
    down.on('error', end);
    up.on('error', end);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: server.address().port,
    blackhole() {
      for (const c of conns) c.blackholed = true;
      return conns.size;
    },
    /** Drops every open connection (the client sees the socket close, 1006). */
    cut() {
      for (const c of conns) { c.down.destroy(); c.up.destroy(); }
    },
    close() {
      for (const c of conns) { c.down.destroy(); c.up.destroy(); }
      return new Promise((r) => server.close(r));
    },
  };
}
