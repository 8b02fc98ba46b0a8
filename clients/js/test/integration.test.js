// Integration tests: the client against a real fanout (target/release/fanout) + Mosquitto +
// nginx, started by scripts/stack.sh on free ports. `ws` stands in for the browser's WebSocket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

import { Client } from '../fanout-client.js';
import { Stack, proxy, token, unique, until, waitFor } from './harness.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function newClient(url, user, opts = {}) {
  const c = new Client({ url, getToken: async () => token(user, 3600), WebSocket, ...opts });
  c.log = [];
  c.messages = [];
  c.on('message', (m) => c.messages.push(m));
  c.on('state', (s) => c.log.push(`state ${s}`));
  c.on('disconnected', (d) => c.log.push(`disconnected ${d.code} ${d.reason} (reconnect in ${d.reconnectIn})`));
  c.on('error', (e) => c.log.push(`error ${e.code}: ${e.message}`));
  c.on('refreshed', (i) => c.log.push(`refreshed on ${i.instanceId}`));
  return c;
}

/** Counts of each message body received by `c`. */
function counts(c) {
  const m = new Map();
  for (const x of c.messages) m.set(x.message, (m.get(x.message) || 0) + 1);
  return m;
}

test('the instance a client is on dies behind nginx: it reconnects to the other one, every message delivered exactly once', async (t) => {
  // A high server rate limit, so the test is about the failover, not pacing.
  const stack = await Stack.up(2, { FANOUT_RATE_LIMIT: '2000', FANOUT_RATE_BURST: '2000' });
  t.after(() => stack.down());
  const alice = unique('alice-');
  const bob = unique('bob-');
  const a = newClient(stack.wsUrl, alice, {
    reconnect: { minDelay: 50, baseDelay: 300 },
    rateLimit: { perSecond: 1500, burst: 1500 },
  });
  t.after(() => a.close());
  const first = await a.connect();
  const other = stack.instances.find((i) => i.id !== first.instanceId).id;
  // Bob sits directly on the instance that survives, so his own connection is not the test.
  const b = newClient(stack.instanceUrl(other), bob);
  t.after(() => b.close());
  await b.connect();

  const N = 200;
  const sends = [];
  const send = (i) => sends.push(a.send(bob, `m${i}`));
  for (let i = 0; i < 100; i++) {
    send(i);
    await sleep(2);
  }
  // Everything so far reached bob (one sender, one recipient: in order), so nothing acked is
  // still on its way inside the instance when it dies.
  await until(() => counts(b).get('m99'), 15000, 'm99 at bob');
  // Freeze alice's instance: what she sends now is written to its socket but never read, so
  // never acked; then kill it. Those sends are in flight when the connection dies.
  await stack.signal(first.instanceId, 'SIGSTOP');
  const before = a.stats.sent;
  for (let i = 100; i < 120; i++) send(i);
  await until(() => a.stats.sent >= before + 20, 5000, 'the 20 sends written to the frozen instance');
  await stack.kill(first.instanceId, 'SIGKILL');
  for (let i = 120; i < N; i++) {
    send(i); // queued while alice reconnects, then sent
    await sleep(2);
  }
  const ids = await Promise.all(sends); // every send is acked, by one instance or the other
  assert.equal(ids.length, N);
  assert.equal(a.state, 'connected');
  assert.equal(a.info.instanceId, other, 'reconnected through nginx to the surviving instance');
  assert.ok(a.stats.resent >= 20, `the 20 unacked sends went again (resent ${a.stats.resent})`);
  // A sentinel after everything: one connection, one recipient, so it arrives last.
  await a.send(bob, 'end');
  await until(() => counts(b).get('end'), 15000, 'the sentinel');
  const c = counts(b);
  const missing = [];
  const doubled = [];
  for (let i = 0; i < N; i++) {
    const n = c.get(`m${i}`) || 0;
    if (n === 0) missing.push(i);
    if (n > 1) doubled.push(i);
  }
  const summary = `resent ${a.stats.resent}, duplicates dropped by bob's client ${b.stats.duplicatesDropped}; alice: ${a.log.join(' | ')}`;
  assert.deepEqual(missing, [], `missing messages; ${summary}`);
  assert.deepEqual(doubled, [], `delivered twice; ${summary}`);
  assert.equal(new Set(b.messages.map((m) => m.id)).size, b.messages.length);
  t.diagnostic(summary);
});

test('acks lost on a half-dead connection: detected by a missing pong, replaced, resent with the same ids, delivered once', async (t) => {
  const stack = await Stack.up(2);
  t.after(() => stack.down());
  const pa = await proxy(stack.port);
  t.after(() => pa.close());
  const pb = await proxy(stack.port);
  t.after(() => pb.close());
  const alice = unique('alice-');
  const bob = unique('bob-');
  const a = newClient(`ws://127.0.0.1:${pa.port}/entrypoint`, alice, {
    ackTimeout: 3000, pongTimeout: 500, reconnect: { minDelay: 50, baseDelay: 200 },
  });
  t.after(() => a.close());
  const b = newClient(`ws://127.0.0.1:${pb.port}/entrypoint`, bob, { reconnect: { minDelay: 10, baseDelay: 50 } });
  t.after(() => b.close());
  await Promise.all([a.connect(), b.connect()]);
  const sends = [];
  for (let i = 0; i < 10; i++) sends.push(a.send(bob, `m${i}`));
  await Promise.all(sends);
  assert.equal(pa.blackhole(), 1, 'one connection through the proxy');
  for (let i = 10; i < 20; i++) sends.push(a.send(bob, `m${i}`));
  // They are published (bob has them) but their acks never reach alice.
  await until(() => counts(b).get('m19'), 10000, 'm19 at bob');
  // Bob reconnects before alice resends, so no instance remembers which ids he was given: only
  // his client's filter stands between him and the copies.
  const back = waitFor(b, 'connected');
  pb.cut();
  await back;
  const ids = await Promise.all(sends);
  assert.equal(ids.length, 20);
  assert.equal(a.stats.deadConnections, 1, a.log.join(' | '));
  assert.equal(a.stats.resent, 10, 'the ten unacked sends went again');
  await a.send(bob, 'end');
  await until(() => counts(b).get('end'), 10000, 'the sentinel');
  const c = counts(b);
  for (let i = 0; i < 20; i++) assert.equal(c.get(`m${i}`), 1, `m${i} delivered ${c.get(`m${i}`) || 0} times`);
  // The resent copies carried the ids of the first sends (UUIDv5 of sender and clientMessageId).
  assert.deepEqual(ids.slice(10), b.messages.filter((m) => /^m1\d$/.test(m.message)).map((m) => m.id));
  assert.equal(b.stats.duplicatesDropped, 10, 'the copies reached bob and his client dropped them');
  t.diagnostic(`alice resent ${a.stats.resent}; bob's client dropped ${b.stats.duplicatesDropped} copies`);
});

test('an expiring token is refreshed without the app noticing (no state change, nothing lost either way)', async (t) => {
  const stack = await Stack.up(2);
  t.after(() => stack.down());
  const alice = unique('alice-');
  const bob = unique('bob-');
  let minted = 0;
  // 4-second tokens: refreshed ahead of expiry, over and over.
  const a = newClient(stack.wsUrl, alice, { getToken: async () => { minted++; return token(alice, 4); } });
  t.after(() => a.close());
  const b = newClient(stack.wsUrl, bob);
  t.after(() => b.close());
  await Promise.all([a.connect(), b.connect()]);
  const states = [];
  a.on('state', (s) => states.push(s));
  const rejected = [];
  const sends = [];
  const end = Date.now() + 10000;
  let i = 0;
  while (Date.now() < end) {
    sends.push(a.send(bob, `a${i}`).catch((e) => rejected.push(e)));
    sends.push(b.send(alice, `b${i}`).catch((e) => rejected.push(e)));
    i++;
    await sleep(100);
  }
  await Promise.all(sends);
  await a.send(bob, 'end');
  await b.send(alice, 'end');
  await until(() => counts(a).get('end') && counts(b).get('end'), 15000, 'the sentinels');
  assert.deepEqual(rejected.map((e) => e.code), [], 'no send failed');
  assert.deepEqual(states, [], `alice's state never changed: ${a.log.join(' | ')}`);
  assert.ok(a.stats.refreshes >= 2, `refreshed ${a.stats.refreshes} times; minted ${minted}`);
  for (const [who, c, prefix] of [['bob', b, 'a'], ['alice', a, 'b']]) {
    const got = counts(c);
    for (let k = 0; k < i; k++) {
      assert.equal(got.get(`${prefix}${k}`), 1, `${who} got ${prefix}${k} ${got.get(`${prefix}${k}`) || 0} times`);
    }
  }
  t.diagnostic(`${i} messages each way over ${a.stats.refreshes} token refreshes; alice dropped ${a.stats.duplicatesDropped} duplicate(s) during overlaps`);
});

test('without refresh ahead: 4001 at expiry, a fresh token at once, queued sends go out, none fail', async (t) => {
  const stack = await Stack.up(1);
  t.after(() => stack.down());
  const alice = unique('alice-');
  const bob = unique('bob-');
  const a = newClient(stack.wsUrl, alice, { refreshBefore: 0, getToken: async () => token(alice, 3) });
  t.after(() => a.close());
  const b = newClient(stack.wsUrl, bob);
  t.after(() => b.close());
  await Promise.all([a.connect(), b.connect()]);
  const closes = [];
  a.on('disconnected', (d) => closes.push(d.code));
  const sends = [];
  let i = 0;
  const end = Date.now() + 7000;
  while (Date.now() < end) {
    sends.push(a.send(bob, `a${i++}`));
    await sleep(50);
  }
  const ids = await Promise.all(sends);
  assert.equal(ids.length, i);
  assert.ok(closes.filter((c) => c === 4001).length >= 1, `saw 4001: ${a.log.join(' | ')}`);
  assert.ok(closes.every((c) => c === 4001), `only 4001s: ${closes}`);
  await a.send(bob, 'end');
  await until(() => counts(b).get('end'), 15000, 'the sentinel');
  const got = counts(b);
  for (let k = 0; k < i; k++) assert.equal(got.get(`a${k}`), 1, `a${k}`);
  assert.equal(a.lastError, null);
});

test('1013 while the broker is down, then recovery', async (t) => {
  const stack = await Stack.up(1, { FANOUT_BROKER_TIMEOUT: '1s' });
  t.after(() => stack.down());
  const alice = unique('alice-');
  // Connected before the outage: stays connected through it.
  const early = newClient(stack.instanceUrl('n1'), unique('early-'));
  t.after(() => early.close());
  await early.connect();

  await stack.stopBroker();
  await until(async () => !(await stack.ready('n1')), 15000, '/readyz to turn 503');
  const a = newClient(stack.instanceUrl('n1'), alice, { reconnect: { minDelay: 200, baseDelay: 500, maxDelay: 1000 } });
  t.after(() => a.close());
  const connected = a.connect();
  const d = await waitFor(a, 'disconnected', (x) => x.code === 1013, 15000, 'a 1013 close');
  assert.ok(d.reconnectIn > 0, 'it will try again');
  assert.equal(a.state !== 'connected', true);
  // Retries keep getting 1013 while the broker is away; then it comes back.
  await waitFor(a, 'disconnected', (x) => x.code === 1013, 15000, 'a second 1013');
  await stack.startBroker();
  const info = await connected;
  assert.equal(info.userId, alice);
  assert.equal(a.state, 'connected');
  const id = await a.send(alice, 'back');
  await until(() => a.messages.some((m) => m.id === id), 10000, 'the message to self');
  assert.equal(early.state, 'connected', 'an open connection stayed open through the outage');
  assert.ok(a.log.filter((l) => l.startsWith('disconnected 1013')).length >= 2, a.log.join(' | '));
});

test('a refused token: getToken is asked again each time, then a clear error', async (t) => {
  const stack = await Stack.up(1);
  t.after(() => stack.down());
  let calls = 0;
  const a = new Client({
    url: stack.wsUrl,
    WebSocket,
    maxAuthFailures: 3,
    reconnect: { minDelay: 10, baseDelay: 50 },
    getToken: async () => { calls++; return token(unique('x-'), -60); }, // expired a minute ago
  });
  const err = await a.connect().then(() => null, (e) => e);
  assert.ok(err, 'connect() rejects');
  assert.equal(err.code, 'unauthorized');
  assert.equal(err.status, 401);
  assert.match(err.message, /expired/i);
  assert.match(err.message, /gave up after 3/);
  assert.equal(calls, 3);
  assert.equal(a.state, 'disconnected');
});

test('100 sends queued before connecting go out after it, paced under the server\'s default rate limit, in order', async (t) => {
  const stack = await Stack.up(1); // default --rate-limit / --rate-burst
  t.after(() => stack.down());
  const alice = unique('alice-');
  const bob = unique('bob-');
  const b = newClient(stack.wsUrl, bob);
  t.after(() => b.close());
  await b.connect();
  const a = newClient(stack.wsUrl, alice);
  t.after(() => a.close());
  const sends = Array.from({ length: 100 }, (_, i) => a.send(bob, `q${i}`).catch((e) => e));
  assert.equal(a.pendingCount, 100);
  await a.connect();
  const results = await Promise.all(sends);
  const failed = results.filter((r) => r instanceof Error).map((e) => e.code);
  assert.deepEqual(failed, [], 'none rejected (no rate_limited)');
  await until(() => b.messages.length >= 100, 15000, 'all 100 at bob');
  assert.deepEqual(b.messages.map((m) => m.message), Array.from({ length: 100 }, (_, i) => `q${i}`));
});
