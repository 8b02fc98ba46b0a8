// Unit tests against a scripted fake socket and mocked timers (node --test).
import { test, mock, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';

import { Client, FanoutError, backoffDelay } from '../fanout-client.js';
import { FakeSocket } from './fake-socket.js';

const tick = (ms) => mock.timers.tick(ms);
/** Lets pending promise callbacks run (setImmediate is not mocked). */
const settle = () => new Promise((r) => setImmediate(r));

let tokens;
function client(opts = {}) {
  tokens = 0;
  const c = new Client({
    url: 'ws://fanout.test/entrypoint',
    getToken: async () => `tok.${++tokens}.sig`,
    WebSocket: FakeSocket,
    rateLimit: null,
    probe: false, // no real HTTP from unit tests; the probe test passes its own fetch
    ...opts,
  });
  c.events = [];
  for (const ev of ['state', 'connected', 'disconnected', 'error', 'refreshed']) {
    c.on(ev, (...a) => c.events.push([ev, ...a]));
  }
  c.messages = [];
  c.raws = [];
  c.on('message', (m) => c.messages.push(m));
  c.on('raw', (data, json) => c.raws.push({ data, json }));
  return c;
}

/** connect() and let the fake server accept. */
async function connected(c, info) {
  const p = c.connect();
  await settle();
  FakeSocket.last.accept(info);
  await p;
  return FakeSocket.last;
}

beforeEach(() => {
  FakeSocket.reset();
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 1_000_000 });
});
afterEach(() => mock.timers.reset());

// ---------------------------------------------------------------------------------------------
// backoff

test('backoff: full jitter between minDelay and the capped exponential ceiling', () => {
  const o = { minDelay: 100, baseDelay: 1000, maxDelay: 30000, factor: 2 };
  // The bounds, exactly: random() = 0 gives the floor (never 0), random() -> 1 the ceiling.
  const ceilings = [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000];
  ceilings.forEach((ceil, attempt) => {
    assert.equal(backoffDelay(attempt, o, () => 0), 100, `floor at attempt ${attempt}`);
    assert.equal(backoffDelay(attempt, o, () => 1), ceil, `ceiling at attempt ${attempt}`);
  });
  assert.equal(backoffDelay(5000, o, () => 1), 30000, 'a huge attempt number stays capped');
  // With Math.random: every sample within the bounds, and spread over the whole range (full
  // jitter, not a fixed delay plus a little noise).
  for (const attempt of [0, 3, 9]) {
    const ceil = Math.min(30000, 1000 * 2 ** attempt);
    const xs = Array.from({ length: 4000 }, () => backoffDelay(attempt, o));
    assert.ok(xs.every((x) => x >= 100 && x <= ceil), `bounds at attempt ${attempt}`);
    const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
    const mid = (100 + ceil) / 2;
    assert.ok(Math.abs(mean - mid) < 0.05 * ceil, `mean ${mean} near ${mid}`);
    const low = xs.filter((x) => x < 100 + 0.2 * (ceil - 100)).length / xs.length;
    const high = xs.filter((x) => x > 100 + 0.8 * (ceil - 100)).length / xs.length;
    assert.ok(low > 0.15 && high > 0.15, `spread: ${low} low, ${high} high`);
  }
});

test('backoff: the client waits at least minDelay and at most the ceiling, growing per failure', async () => {
  const c = client({ reconnect: { minDelay: 200, baseDelay: 1000, maxDelay: 4000, factor: 2 }, random: () => 0.999 });
  c.connect();
  const delays = [];
  c.on('disconnected', (d) => delays.push(d.reconnectIn));
  for (let i = 0; i < 5; i++) {
    await settle();
    const s = FakeSocket.last;
    s.open();
    s.serverClose(1013, 'broker unavailable');
    const n = FakeSocket.instances.length;
    tick(199);
    await settle();
    assert.equal(FakeSocket.instances.length, n, `no new socket before minDelay (failure ${i + 1})`);
    tick(delays[i] - 199);
    await settle();
    assert.equal(FakeSocket.instances.length, n + 1, `a new socket after ${delays[i]} ms`);
  }
  const expect = [1000, 2000, 4000, 4000, 4000].map((ceil) => 200 + 0.999 * (ceil - 200));
  delays.forEach((d, i) => assert.ok(Math.abs(d - expect[i]) < 1e-6, `delay ${i}: ${d} vs ${expect[i]}`));
  // random() = 0: the floor, still not zero.
  const z = client({ reconnect: { minDelay: 150 }, random: () => 0 });
  z.connect();
  await settle();
  const n = FakeSocket.instances.length;
  FakeSocket.last.open();
  FakeSocket.last.serverClose(1001, 'shutting down');
  tick(149);
  await settle();
  assert.equal(FakeSocket.instances.length, n);
  tick(1);
  await settle();
  assert.equal(FakeSocket.instances.length, n + 1);
  c.close();
  z.close();
});

test('backoff resets after a stable connection but not after a flapping one', async () => {
  const c = client({ random: () => 1, stableAfter: 5000 });
  c.connect();
  const delays = [];
  c.on('disconnected', (d) => delays.push(d.reconnectIn));
  for (let i = 0; i < 3; i++) {
    await settle();
    FakeSocket.last.accept();
    tick(100); // connected, then closed quickly: flapping
    FakeSocket.last.serverClose(1001);
    tick(delays[i]);
  }
  assert.deepEqual(delays, [1000, 2000, 4000]);
  await settle();
  FakeSocket.last.accept();
  tick(6000); // stable
  FakeSocket.last.serverClose(1001);
  assert.equal(delays[3], 1000, 'back to the first step after a stable connection');
  c.close();
});

// ---------------------------------------------------------------------------------------------
// states and tokens

test('states: connecting until the connected frame, then connected; events in order', async () => {
  const c = client();
  assert.equal(c.state, 'disconnected');
  const p = c.connect();
  assert.equal(c.state, 'connecting');
  await settle();
  const s = FakeSocket.last;
  assert.equal(s.url, 'ws://fanout.test/entrypoint');
  assert.deepEqual(s.protocols, ['bearer', 'tok.1.sig'], 'token as the bearer subprotocol');
  s.open();
  assert.equal(c.state, 'connecting', 'open is not connected: the subscription is not confirmed yet');
  s.push({ event: 'connected', data: { userId: 'alice', connectionId: 'x', instanceId: 'n1', expiresAt: 4102444800 } });
  const info = await p;
  assert.equal(info.userId, 'alice');
  assert.equal(c.state, 'connected');
  assert.equal(c.info.instanceId, 'n1');
  s.serverClose(1001, 'shutting down');
  assert.equal(c.state, 'disconnected');
  const d = c.events.find((e) => e[0] === 'disconnected')[1];
  assert.equal(d.code, 1001);
  assert.equal(d.wasConnected, true);
  assert.ok(d.reconnectIn >= 100 && d.reconnectIn <= 1000, `reconnectIn ${d.reconnectIn}`);
  tick(d.reconnectIn);
  assert.equal(c.state, 'connecting');
  await settle();
  assert.deepEqual(FakeSocket.last.protocols, ['bearer', 'tok.2.sig'], 'getToken before every connect');
  FakeSocket.last.accept({ instanceId: 'n2' });
  assert.equal(c.state, 'connected');
  assert.equal(c.info.instanceId, 'n2');
  assert.deepEqual(
    c.events.filter((e) => e[0] === 'state').map((e) => e[1]),
    ['connecting', 'connected', 'disconnected', 'connecting', 'connected'],
  );
  c.close();
  assert.equal(c.state, 'disconnected');
  tick(60000);
  await settle();
  assert.equal(FakeSocket.instances.length, 2, 'no reconnect after close()');
});

test('token transports: bearer (default), plain subprotocol, query', async () => {
  const a = client({ tokenTransport: 'protocol' });
  a.connect();
  await settle();
  assert.equal(FakeSocket.last.protocols, 'tok.1.sig');
  const b = client({ tokenTransport: 'query', url: 'ws://h/entrypoint?x=1' });
  b.connect();
  await settle();
  assert.equal(FakeSocket.last.url, 'ws://h/entrypoint?x=1&token=tok.1.sig');
  assert.equal(FakeSocket.last.protocols, undefined);
  a.close();
  b.close();
});

test('4001 after a good connection: a fresh token and a reconnect at once', async () => {
  const c = client();
  const s = await connected(c);
  tick(60000);
  s.serverClose(4001, 'token expired');
  const d = c.events.find((e) => e[0] === 'disconnected')[1];
  assert.equal(d.reconnectIn, 0);
  tick(0);
  await settle();
  assert.equal(FakeSocket.instances.length, 2);
  assert.deepEqual(FakeSocket.last.protocols, ['bearer', 'tok.2.sig']);
  c.close();
});

test('4001 at once (getToken keeps returning an expired token) counts as refused; gives up after N', async () => {
  const c = client({ getToken: async () => 'expired.token.sig', maxAuthFailures: 3 });
  c.connect();
  for (let i = 0; i < 3; i++) {
    await settle();
    FakeSocket.last.accept();
    tick(10);
    FakeSocket.last.serverClose(4001, 'token expired');
    tick(60000);
  }
  const err = c.lastError;
  assert.ok(err instanceof FanoutError);
  assert.equal(err.code, 'unauthorized');
  assert.equal(err.fatal, true);
  assert.match(err.message, /expired/);
  assert.equal(c.state, 'disconnected');
  tick(600000);
  await settle();
  assert.equal(FakeSocket.instances.length, 3, 'stopped');
});

test('refused upgrade (401): getToken again each time, a clear error after N failures', async () => {
  const c = client({ maxAuthFailures: 3 });
  const done = c.connect().catch((e) => e);
  for (let i = 0; i < 3; i++) {
    await settle();
    FakeSocket.last.refuse(401);
    await settle();
    tick(60000);
  }
  const err = await done;
  assert.equal(err.code, 'unauthorized');
  assert.equal(err.status, 401);
  assert.match(err.message, /gave up after 3/);
  assert.equal(tokens, 3, 'a fresh token for every try');
  assert.equal(c.lastError, err);
  assert.equal(c.state, 'disconnected');
  tick(600000);
  await settle();
  assert.equal(FakeSocket.instances.length, 3);
  // connect() again starts over.
  c.connect().catch(() => {});
  await settle();
  assert.equal(FakeSocket.instances.length, 4);
  c.close();
});

test('refused upgrade seen as a bare 1006 (browser): the probe tells 401 from other failures', async () => {
  let answer = 401;
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, auth: init.headers.authorization });
    return { status: answer, json: async () => ({ error: 'unauthorized', message: 'token expired' }) };
  };
  const c = client({ fetch, probe: true, maxAuthFailures: 2, url: 'wss://h/entrypoint' });
  const done = c.connect().catch((e) => e);
  await settle();
  FakeSocket.last.refuseSilently();
  await settle();
  assert.deepEqual(calls[0], { url: 'https://h/entrypoint', auth: 'Bearer tok.1.sig' });
  const e1 = c.events.find((e) => e[0] === 'error')[1];
  assert.equal(e1.code, 'unauthorized');
  assert.match(e1.message, /token expired/, 'the server\'s reason');
  // A 502 from the proxy (all instances down) is not the token's fault: retried forever.
  answer = 502;
  for (let i = 0; i < 6; i++) {
    tick(60000);
    await settle();
    FakeSocket.last.refuseSilently();
    await settle();
  }
  assert.equal(c.state, 'disconnected');
  assert.equal(c.lastError, null, 'still trying');
  answer = 401;
  tick(60000);
  await settle();
  FakeSocket.last.refuseSilently();
  await settle();
  // The 502s in between do not reset the count of refused tokens? They do not add to it either:
  // one 401 + ... + one 401 = 2 = maxAuthFailures.
  const err = await done;
  assert.equal(err.code, 'unauthorized');
  assert.equal(c.state, 'disconnected');
});

test('getToken that throws, hangs or returns nothing: an error event, then a retry after backoff', async () => {
  let mode = 'throw';
  const c = client({
    connectTimeout: 5000,
    random: () => 0,
    getToken: () => {
      if (mode === 'throw') throw new Error('login service down');
      if (mode === 'hang') return new Promise(() => {});
      if (mode === 'empty') return '';
      return 'good.token.sig';
    },
  });
  const p = c.connect();
  await settle();
  let errs = c.events.filter((e) => e[0] === 'error');
  assert.equal(errs.length, 1);
  assert.equal(errs[0][1].code, 'token_error');
  assert.match(errs[0][1].message, /login service down/);
  assert.equal(c.state, 'disconnected');
  assert.equal(FakeSocket.instances.length, 0);
  mode = 'hang';
  tick(100);
  await settle();
  assert.equal(c.state, 'connecting');
  tick(5000);
  await settle();
  errs = c.events.filter((e) => e[0] === 'error');
  assert.match(errs[1][1].message, /did not answer/);
  mode = 'empty';
  tick(100);
  await settle();
  errs = c.events.filter((e) => e[0] === 'error');
  assert.match(errs[2][1].message, /no token/);
  mode = 'ok';
  tick(100);
  await settle();
  FakeSocket.last.accept();
  await p;
  assert.deepEqual(FakeSocket.last.protocols, ['bearer', 'good.token.sig']);
  c.close();
});

test('no connected frame within connectTimeout: the socket is dropped and replaced', async () => {
  const c = client({ connectTimeout: 3000, random: () => 0 });
  c.connect();
  await settle();
  const s = FakeSocket.last;
  s.open();
  tick(3000);
  assert.ok(s.terminated || s.closedByClient, 'dropped');
  assert.equal(c.state, 'disconnected');
  tick(100);
  await settle();
  assert.equal(FakeSocket.instances.length, 2);
  c.close();
});

test('1001 and 1013 reconnect after backoff; 4008 reconnects once and says why, twice in a row stops', async () => {
  const c = client({ random: () => 0.5 });
  let s = await connected(c);
  tick(10000);
  s.serverClose(1013, 'try again later');
  tick(5000);
  await settle();
  s = FakeSocket.last;
  s.accept();
  tick(10000);
  s.serverClose(4008, 'slow consumer');
  const e1 = c.events.filter((e) => e[0] === 'error').pop()[1];
  assert.equal(e1.code, 'slow_consumer');
  assert.match(e1.message, /reconnecting once/);
  tick(5000);
  await settle();
  s = FakeSocket.last;
  s.accept();
  tick(100);
  s.serverClose(4008, 'slow consumer');
  assert.equal(c.state, 'disconnected');
  assert.equal(c.lastError.code, 'slow_consumer');
  assert.equal(c.lastError.fatal, true);
  assert.equal(c.lastError.closeCode, 4008);
  const n = FakeSocket.instances.length;
  tick(600000);
  await settle();
  assert.equal(FakeSocket.instances.length, n);
});

test('1009: the largest message in flight is rejected as too_big (not resent), the rest go again', async () => {
  const c = client();
  const s = await connected(c);
  const small = c.send('bob', 'hi');
  const big = c.send('bob', 'x'.repeat(5000));
  const small2 = c.send('bob', 'there');
  assert.equal(s.chats().length, 3);
  s.serverClose(1009, 'message too big');
  const err = await big.catch((e) => e);
  assert.equal(err.code, 'too_big');
  tick(2000);
  await settle();
  const s2 = FakeSocket.last;
  s2.accept();
  const again = s2.chats();
  assert.deepEqual(again.map((f) => f.data.message), ['hi', 'there']);
  for (const f of again) s2.ack(f.data.clientMessageId);
  assert.equal(typeof (await small), 'string');
  assert.equal(typeof (await small2), 'string');
  c.close();
});

test('an unhandled event listener error does not break the client', async () => {
  const c = client();
  const orig = console.error;
  const logged = [];
  console.error = (...a) => logged.push(a);
  try {
    c.on('connected', () => { throw new Error('app bug'); });
    const s = await connected(c);
    assert.equal(c.state, 'connected');
    const p = c.send('bob', 'still works');
    s.ack(s.chats()[0].data.clientMessageId, 'srv-1');
    assert.equal(await p, 'srv-1');
  } finally {
    console.error = orig;
  }
  assert.ok(logged.length >= 1);
  c.close();
});

// ---------------------------------------------------------------------------------------------
// sending, queueing, resend

test('send/sendToMany/broadcast: frames with a clientMessageId; ack resolves with the server id', async () => {
  const c = client();
  const s = await connected(c);
  const a = c.send('bob', { text: 'hi' });
  const b = c.sendToMany(['bob', 'carol'], 'hey');
  const d = c.broadcast('all');
  const f = s.chats();
  assert.equal(f[0].event, 'send_chat_message_to_participant');
  assert.deepEqual(f[0].data.participantId, 'bob');
  assert.deepEqual(f[0].data.message, { text: 'hi' });
  assert.equal(f[1].event, 'send_chat_message_to_many_participants');
  assert.deepEqual(f[1].data.participantIds, ['bob', 'carol']);
  assert.equal(f[2].event, 'send_chat_message_to_all_participants');
  const ids = f.map((x) => x.data.clientMessageId);
  assert.equal(new Set(ids).size, 3, 'distinct clientMessageIds');
  assert.match(ids[0], /^[0-9a-f]{18}-\d+$/);
  // Two clients never share a prefix.
  assert.notEqual(client().newClientMessageId().split('-')[0], ids[0].split('-')[0]);
  s.ack(ids[1], 'id-b');
  s.ack(ids[0], 'id-a');
  s.push({ event: 'error', data: { code: 'forbidden', message: 'needs scope broadcast', clientMessageId: ids[2] } });
  assert.equal(await a, 'id-a');
  assert.equal(await b, 'id-b');
  const err = await d.catch((e) => e);
  assert.ok(err instanceof FanoutError);
  assert.equal(err.code, 'forbidden');
  assert.equal(err.clientMessageId, ids[2]);
  assert.equal(err.retryable, false);
  c.close();
});

test('every server error code rejects the matching send with that code', async () => {
  const c = client();
  const s = await connected(c);
  const codes = ['rate_limited', 'forbidden', 'unavailable', 'bad_json', 'invalid_participant',
    'too_many_recipients', 'unknown_event'];
  const ps = codes.map((code) => c.send('bob', code).catch((e) => e));
  s.chats().forEach((f, i) => s.push({
    event: 'error', data: { code: codes[i], message: `because ${codes[i]}`, clientMessageId: f.data.clientMessageId },
  }));
  const errs = await Promise.all(ps);
  assert.deepEqual(errs.map((e) => e.code), codes);
  assert.deepEqual(errs.map((e) => e.retryable), [true, false, true, false, false, false, false]);
  // An error frame for nothing pending reaches on('error').
  s.push({ event: 'error', data: { code: 'bad_json', message: 'x' } });
  assert.equal(c.events.filter((e) => e[0] === 'error').pop()[1].code, 'bad_json');
  c.close();
});

test('queue: sends while disconnected wait, in order, and go out after connect', async () => {
  const c = client();
  const ps = [c.send('bob', 1), c.send('bob', 2), c.send('bob', 3)];
  assert.equal(c.pendingCount, 3);
  c.connect();
  await settle();
  const s = FakeSocket.last;
  s.open();
  assert.equal(s.chats().length, 0, 'nothing before the connected frame');
  s.push({ event: 'connected', data: { userId: 'alice', connectionId: 'x', instanceId: 'n1', expiresAt: 4102444800 } });
  assert.deepEqual(s.chats().map((f) => f.data.message), [1, 2, 3]);
  for (const f of s.chats()) s.ack(f.data.clientMessageId);
  await Promise.all(ps);
  assert.equal(c.pendingCount, 0);
  c.close();
});

test('queue is bounded: beyond maxQueue a send rejects at once with queue_full', async () => {
  const c = client({ maxQueue: 5 });
  const ps = Array.from({ length: 5 }, (_, i) => c.send('bob', i));
  const err = await c.send('bob', 'one too many').catch((e) => e);
  assert.equal(err.code, 'queue_full');
  assert.equal(err.retryable, true);
  c.close();
  for (const p of ps) assert.equal((await p.catch((e) => e)).code, 'closed');
});

test('100 queued sends go out after reconnect; the rate limit paces what exceeds the burst', async () => {
  const c = client({ rateLimit: { perSecond: 10, burst: 100 } });
  const ps = Array.from({ length: 105 }, (_, i) => c.send('bob', i));
  c.connect();
  await settle();
  const s = FakeSocket.last;
  s.accept();
  assert.equal(s.chats().length, 100, 'the burst at once');
  for (const f of s.chats()) s.ack(f.data.clientMessageId);
  tick(99);
  assert.equal(s.chats().length, 100);
  tick(1);
  assert.equal(s.chats().length, 101, 'then 10 per second');
  tick(400);
  assert.equal(s.chats().length, 105);
  assert.deepEqual(s.chats().map((f) => f.data.message), Array.from({ length: 105 }, (_, i) => i), 'in order');
  for (const f of s.chats().slice(100)) s.ack(f.data.clientMessageId);
  assert.equal((await Promise.all(ps)).length, 105);
  // A sendToMany costs one per distinct recipient.
  const c2 = client({ rateLimit: { perSecond: 1, burst: 3 } });
  const s2 = await connected(c2);
  c2.sendToMany(['a', 'b', 'a', 'c'], 'x').catch(() => {});
  c2.send('d', 'y').catch(() => {});
  assert.equal(s2.chats().length, 1);
  tick(999);
  assert.equal(s2.chats().length, 1);
  tick(1);
  assert.equal(s2.chats().length, 2);
  c2.close();
  c.close();
});

test('safe resend: a message whose ack was lost goes again after reconnect with the same clientMessageId', async () => {
  const c = client();
  let s = await connected(c);
  const p1 = c.send('bob', 'one');
  const p2 = c.send('bob', 'two');
  const [f1, f2] = s.chats();
  s.ack(f1.data.clientMessageId, 'id-one');
  assert.equal(await p1, 'id-one');
  s.serverClose(1006); // the ack of "two" is lost with the connection
  const p3 = c.send('bob', 'three'); // while disconnected
  tick(2000);
  await settle();
  s = FakeSocket.last;
  s.accept();
  const again = s.chats();
  assert.deepEqual(again.map((f) => f.data.message), ['two', 'three'], 'the unacked one first, then the queued one');
  assert.equal(again[0].data.clientMessageId, f2.data.clientMessageId, 'the same clientMessageId');
  assert.equal(again[0].event, f2.event);
  assert.equal(c.stats.resent, 1);
  // A stray ack for "one" again (already settled) changes nothing; acks come in any order.
  s.ack(f1.data.clientMessageId, 'other');
  s.ack(again[1].data.clientMessageId, 'id-three');
  s.ack(again[0].data.clientMessageId, 'id-two');
  assert.equal(await p2, 'id-two');
  assert.equal(await p3, 'id-three');
  assert.equal(c.pendingCount, 0);
  c.close();
});

test('the same clientMessageId passed twice is one send with one answer', async () => {
  const c = client();
  const s = await connected(c);
  const a = c.send('bob', 'x', { clientMessageId: 'mine-1' });
  const b = c.send('bob', 'x', { clientMessageId: 'mine-1' });
  assert.equal(a, b);
  assert.equal(s.chats().length, 1);
  s.ack('mine-1', 'srv');
  assert.equal(await a, 'srv');
  c.close();
});

test('ack overdue: a ping first; a dead socket is replaced and the message resent', async () => {
  const c = client({ ackTimeout: 1000, pongTimeout: 500, random: () => 0 });
  const s = await connected(c);
  const p = c.send('bob', 'x');
  tick(1000);
  assert.deepEqual(s.frames().pop(), { event: 'ping', data: {} });
  tick(500);
  assert.equal(c.state, 'disconnected');
  tick(100);
  await settle();
  FakeSocket.last.accept();
  const f = FakeSocket.last.chats()[0];
  assert.equal(f.data.message, 'x');
  FakeSocket.last.ack(f.data.clientMessageId, 'ok');
  assert.equal(await p, 'ok');
  c.close();
});

test('timeouts: a live socket but no ack rejects; queued too long rejects with timeout', async () => {
  const c = client({ ackTimeout: 1000, pongTimeout: 500, sendTimeout: 5000 });
  const s = await connected(c);
  const p = c.send('bob', 'x');
  tick(1000);
  s.push({ event: 'pong', data: {} });
  tick(500);
  assert.equal(c.state, 'connected');
  const err = await p.catch((e) => e);
  assert.equal(err.code, 'timeout');
  assert.match(err.message, /same clientMessageId/);
  s.serverClose(1006);
  const q = c.send('bob', 'queued');
  tick(5000);
  const err2 = await q.catch((e) => e);
  assert.equal(err2.code, 'timeout');
  assert.match(err2.message, /not connected/);
  c.close();
});

test('too big for maxMessageBytes: rejected before sending', async () => {
  const c = client({ maxMessageBytes: 200 });
  const s = await connected(c);
  const err = await c.send('bob', 'é'.repeat(90)).catch((e) => e); // 180 bytes of UTF-8 + envelope
  assert.equal(err.code, 'too_big');
  assert.equal(s.chats().length, 0);
  c.close();
});

test('close() rejects pending sends with closed and stops reconnecting', async () => {
  const c = client();
  const s = await connected(c);
  const p = c.send('bob', 'x');
  c.close();
  assert.ok(s.closedByClient);
  assert.equal(s.closedByClient.code, 1000);
  const err = await p.catch((e) => e);
  assert.equal(err.code, 'closed');
  assert.equal(c.state, 'disconnected');
});

// ---------------------------------------------------------------------------------------------
// receiving

test('messages: typed envelopes reach on(message); duplicates by id are dropped; bounded memory', async () => {
  const c = client({ dedupeSize: 3 });
  const s = await connected(c);
  const env = (id, message) => ({
    event: 'chat_message', data: { id, from: 'bob', to: 'alice', message, sentAt: 1767225600123, clientMessageId: 'c-1' },
  });
  s.push(env('a', 'first'));
  s.push(env('a', 'first again'));
  assert.deepEqual(c.messages.map((m) => m.message), ['first']);
  assert.equal(c.messages[0].from, 'bob');
  assert.equal(c.messages[0].clientMessageId, 'c-1');
  assert.equal(c.stats.duplicatesDropped, 1);
  s.push(env('b', 2));
  s.push(env('c', 3));
  s.push(env('d', 4));
  s.push(env('a', 'remembered no more'));
  assert.deepEqual(c.messages.map((m) => m.message), ['first', 2, 3, 4, 'remembered no more']);
  // Across a reconnect the filter stays: a resend that reaches us on the new socket is dropped.
  s.serverClose(1001);
  tick(2000);
  await settle();
  FakeSocket.last.accept();
  FakeSocket.last.push(env('d', 'copy of 4'));
  assert.equal(c.messages.length, 5);
  c.close();
});

test('raw: frames that are not fanout envelopes reach on(raw)', async () => {
  const c = client();
  const s = await connected(c);
  const injected = '{"event":"chat_message","data":{"from":"ops","message":"maintenance at 5"}}';
  s.push(injected);
  s.push('not json at all');
  s.push(new Uint8Array([0xff, 0x00]).buffer);
  s.push({ event: 'something_else', data: 1 });
  s.push('null');
  s.push('[1,2]');
  assert.equal(c.messages.length, 0);
  assert.equal(c.raws.length, 6);
  assert.equal(c.raws[0].data, injected);
  assert.equal(c.raws[0].json.data.from, 'ops');
  assert.equal(c.raws[1].json, undefined);
  assert.ok(c.raws[2].data instanceof ArrayBuffer);
  assert.equal(c.state, 'connected');
  c.close();
});

test('hostile frames: nothing throws, nothing is mis-settled', async () => {
  const c = client();
  const s = await connected(c);
  const p = c.send('bob', 'x');
  const cmid = s.chats()[0].data.clientMessageId;
  for (const f of [
    { event: 'ack' }, { event: 'ack', data: null }, { event: 'ack', data: [] }, { event: 'ack', data: { id: 'z' } },
    { event: 'ack', data: { clientMessageId: 42 } }, { event: 'error' }, { event: 'error', data: 'x' },
    { event: 'connected', data: { userId: 'mallory', instanceId: 'evil' } }, // a second connected: ignored
    { event: 'connected' }, { event: 'chat_message', data: { id: 5 } }, { event: 'pong', data: {} },
    { event: 123 }, { data: {} },
  ]) s.push(f);
  assert.equal(c.info.userId, 'alice', 'a second connected frame changes nothing');
  assert.equal(c.pendingCount, 1);
  s.ack(cmid, 'ok');
  assert.equal(await p, 'ok');
  c.close();
});

// ---------------------------------------------------------------------------------------------
// dead connections

test('dead connection: after pingInterval of silence a ping; no pong within pongTimeout -> replaced', async () => {
  const c = client({ pingInterval: 15000, pongTimeout: 5000, random: () => 0 });
  const s = await connected(c);
  tick(14999);
  assert.equal(s.frames().filter((f) => f.event === 'ping').length, 0);
  tick(1);
  assert.deepEqual(s.frames().pop(), { event: 'ping', data: {} });
  s.push({ event: 'pong', data: {} }); // alive
  tick(5000);
  assert.equal(FakeSocket.instances.length, 1);
  assert.equal(c.state, 'connected');
  // Traffic counts as a sign of life: no ping while frames arrive.
  for (let i = 0; i < 10; i++) {
    s.push({ event: 'chat_message', data: { id: `m${i}`, from: 'b', to: 'alice', message: i, sentAt: 1 } });
    tick(10000);
  }
  assert.equal(s.frames().filter((f) => f.event === 'ping').length, 1);
  // Now silence, and no pong.
  tick(15000);
  assert.equal(s.frames().filter((f) => f.event === 'ping').length, 2);
  const p = c.send('bob', 'in flight when it died');
  tick(4999);
  assert.equal(c.state, 'connected');
  tick(1);
  assert.equal(c.state, 'disconnected');
  assert.ok(s.terminated, 'the dead socket is terminated, not waited for');
  assert.equal(c.stats.deadConnections, 1);
  tick(100);
  await settle();
  const s2 = FakeSocket.last;
  assert.notEqual(s2, s);
  s2.accept();
  const again = s2.chats();
  assert.equal(again[0].data.message, 'in flight when it died', 'resent on the new socket');
  s2.ack(again[0].data.clientMessageId, 'fine');
  assert.equal(await p, 'fine');
  // The old socket's late frames are ignored.
  s.push({ event: 'chat_message', data: { id: 'late', from: 'b', to: 'alice', message: 'late', sentAt: 1 } });
  assert.equal(c.messages.filter((m) => m.message === 'late').length, 0);
  c.close();
});

test('a socket that throws on send (closing mid-send) is dropped and the message resent', async () => {
  const c = client({ random: () => 0 });
  const s = await connected(c);
  s.throwOnSend = 'socket is closing';
  const p = c.send('bob', 'x');
  assert.equal(c.state, 'disconnected');
  tick(100);
  await settle();
  FakeSocket.last.accept();
  const f = FakeSocket.last.chats()[0];
  assert.equal(f.data.message, 'x');
  FakeSocket.last.ack(f.data.clientMessageId, 'ok');
  assert.equal(await p, 'ok');
  c.close();
});

// ---------------------------------------------------------------------------------------------
// token refresh ahead of expiry (make before break)

test('refresh: a new connection before the token expires; the app stays connected; order kept', async () => {
  const now = Date.now();
  const c = client({ refreshBefore: 30000 });
  const s1 = await connected(c, { expiresAt: Math.floor(now / 1000) + 3600, instanceId: 'n1' });
  const states = c.events.filter((e) => e[0] === 'state').length;
  tick(3600_000 - 30_000 - 1000);
  await settle();
  assert.equal(FakeSocket.instances.length, 1, 'not yet');
  tick(1000);
  await settle();
  assert.equal(FakeSocket.instances.length, 2, 'the refresh connection');
  const s2 = FakeSocket.last;
  assert.deepEqual(s2.protocols, ['bearer', 'tok.2.sig']);
  // Sent while the new one opens: goes on the old one, which stays until its ack.
  const a = c.send('bob', 'a');
  assert.equal(s1.chats().length, 1);
  s2.accept({ expiresAt: Math.floor(Date.now() / 1000) + 3600, instanceId: 'n2' });
  assert.equal(c.info.instanceId, 'n2');
  assert.equal(s1.closedByClient, null, 'the old socket waits for its ack');
  const b = c.send('bob', 'b');
  assert.equal(s2.chats().length, 0, 'b waits behind a (order)');
  s1.ack(s1.chats()[0].data.clientMessageId, 'id-a');
  assert.equal(await a, 'id-a');
  // A message published just before the new subscription still reaches the old socket.
  const late = { event: 'chat_message', data: { id: 'x1', from: 'bob', to: 'alice', message: 'late', sentAt: 1 } };
  s1.push(late);
  s2.push(late);
  assert.deepEqual(c.messages.map((m) => m.message), ['late'], 'once, though both sockets got it');
  assert.equal(s1.closedByClient, null, 'kept for refreshOverlap');
  tick(2000);
  assert.equal(s1.closedByClient.code, 1000, 'closed after the overlap, its acks being in');
  assert.equal(s2.chats()[0].data.message, 'b');
  s2.ack(s2.chats()[0].data.clientMessageId, 'id-b');
  assert.equal(await b, 'id-b');
  assert.equal(c.events.filter((e) => e[0] === 'state').length, states, 'no state change: the app did not notice');
  assert.equal(c.events.filter((e) => e[0] === 'refreshed').length, 1);
  assert.equal(c.stats.refreshes, 1);
  // A message that reaches both sockets during the overlap is delivered once.
  c.close();
});

test('refresh: the old socket dies with an ack outstanding -> resent on the new one', async () => {
  const c = client({ refreshBefore: 10000 });
  const exp = Math.floor(Date.now() / 1000) + 60;
  const s1 = await connected(c, { expiresAt: exp });
  tick(50000); // 60 s - min(10 s, 60/4 s)
  await settle();
  const s2 = FakeSocket.last;
  const a = c.send('bob', 'a');
  s2.accept({ expiresAt: exp + 60 });
  s1.serverClose(1006);
  const f = s2.chats()[0];
  assert.equal(f.data.message, 'a');
  assert.equal(f.data.clientMessageId, s1.chats()[0].data.clientMessageId);
  s2.ack(f.data.clientMessageId, 'id-a');
  assert.equal(await a, 'id-a');
  assert.equal(c.state, 'connected');
  c.close();
});

test('refresh that fails (refused, getToken error) retries; 4001 still reconnects if nothing worked', async () => {
  let fail = true;
  const c = client({ refreshBefore: 10000, random: () => 0 });
  c._o.getToken = async () => {
    tokens++;
    if (tokens > 1 && fail) throw new Error('login down');
    return `tok.${tokens}.sig`;
  };
  const exp = Math.floor(Date.now() / 1000) + 40;
  const s1 = await connected(c, { expiresAt: exp });
  tick(30000);
  await settle();
  assert.equal(c.events.filter((e) => e[0] === 'error').pop()[1].code, 'token_error');
  assert.equal(c.state, 'connected');
  fail = false;
  tick(100);
  await settle();
  const s2 = FakeSocket.last;
  assert.notEqual(s2, s1);
  s2.refuse(401);
  tick(1000);
  await settle();
  assert.equal(c.state, 'connected', 'still on the old socket');
  const s3 = FakeSocket.last;
  assert.notEqual(s3, s2);
  s3.accept({ expiresAt: exp + 40 });
  tick(2000); // refreshOverlap
  assert.ok(s1.closedByClient);
  assert.equal(c.state, 'connected');
  c.close();
});

test('far-future expiresAt does not schedule a refresh (no setTimeout overflow)', async () => {
  const c = client();
  await connected(c, { expiresAt: 253402300799 });
  tick(3_000_000);
  await settle();
  assert.equal(FakeSocket.instances.length, 1);
  c.close();
});

test('Node without a global WebSocket and no option: a clear fatal error', async () => {
  const c = new Client({ url: 'ws://x/entrypoint', getToken: async () => 't.t.t' });
  if (globalThis.WebSocket) return; // Node >= 22 has one
  const err = await c.connect().catch((e) => e);
  assert.equal(err.code, 'connection_failed');
  assert.match(err.message, /pass \{ WebSocket \}/);
});

// ---------------------------------------------------------------------------------------------
// a hostile server, a flapping network, an app that does odd things

test('close() from inside the connected listener: nothing keeps running', async () => {
  const c = client({ refreshBefore: 30000 });
  c.on('connected', () => c.close());
  c.connect();
  await settle();
  FakeSocket.last.accept({ expiresAt: Math.floor(Date.now() / 1000) + 3600 });
  assert.equal(c.state, 'disconnected');
  tick(10_000_000);
  await settle();
  assert.equal(FakeSocket.instances.length, 1, 'no refresh, no reconnect');
});

test('connect(), close(), connect() while getToken is still pending: one live socket, the latest', async () => {
  let release;
  const c = client({ getToken: () => new Promise((r) => { release = r; }) });
  c.connect();
  await settle();
  const first = release;
  c.close();
  c.connect();
  await settle();
  const second = release;
  assert.notEqual(first, second);
  first('old.token.sig');
  await settle();
  assert.equal(FakeSocket.instances.length, 0, 'the stale token opens nothing');
  second('new.token.sig');
  await settle();
  assert.equal(FakeSocket.instances.length, 1);
  assert.deepEqual(FakeSocket.last.protocols, ['bearer', 'new.token.sig']);
  c.close();
});

test('a token that cannot be a subprotocol (or a bad URL): a clear fatal error, no retry loop', async () => {
  class Strict extends FakeSocket {
    constructor(url, protocols) {
      if ([].concat(protocols).some((p) => /\s/.test(p))) throw new SyntaxError('invalid subprotocol');
      super(url, protocols);
    }
  }
  const c = client({ WebSocket: Strict, getToken: async () => 'has a space' });
  const err = await c.connect().catch((e) => e);
  assert.equal(err.code, 'connection_failed');
  assert.match(err.message, /invalid subprotocol/);
  tick(600000);
  await settle();
  assert.equal(c.state, 'disconnected');
});

test('flapping: accepted, then closed at once, again and again: the backoff keeps growing, sends survive', async () => {
  const c = client({ random: () => 1, reconnect: { maxDelay: 8000 } });
  const p = c.send('bob', 'survives the flapping');
  c.connect();
  const delays = [];
  c.on('disconnected', (d) => delays.push(d.reconnectIn));
  for (let i = 0; i < 6; i++) {
    await settle();
    const s = FakeSocket.last;
    s.accept();
    assert.equal(s.chats().length, 1, 'written on each connection');
    s.serverClose(i % 2 ? 1006 : 1001);
    tick(delays[i]);
  }
  assert.deepEqual(delays, [1000, 2000, 4000, 8000, 8000, 8000]);
  await settle();
  const s = FakeSocket.last;
  s.accept();
  const f = s.chats()[0];
  assert.equal(f.data.message, 'survives the flapping');
  assert.equal(c.stats.resent, 6, 'the same message, resent on each new connection');
  s.ack(f.data.clientMessageId, 'finally');
  assert.equal(await p, 'finally');
  c.close();
});

test('acks for resent messages arriving on the new socket, plus stale and duplicate acks, settle each send once', async () => {
  const c = client();
  let s = await connected(c);
  const ps = Array.from({ length: 50 }, (_, i) => c.send('bob', i));
  const first = s.chats();
  for (const f of first.slice(0, 20)) s.ack(f.data.clientMessageId, `id-${f.data.message}`);
  s.serverClose(1006);
  tick(2000);
  await settle();
  s = FakeSocket.last;
  s.accept();
  const again = s.chats();
  assert.deepEqual(again.map((f) => f.data.message), Array.from({ length: 30 }, (_, i) => i + 20));
  // Acks in reverse, each twice, and the old ones again.
  for (const f of [...again].reverse()) {
    s.ack(f.data.clientMessageId, `id-${f.data.message}`);
    s.ack(f.data.clientMessageId, 'a second, different id');
  }
  for (const f of first.slice(0, 20)) s.ack(f.data.clientMessageId, 'stale');
  const ids = await Promise.all(ps);
  assert.deepEqual(ids, Array.from({ length: 50 }, (_, i) => `id-${i}`));
  assert.equal(c.pendingCount, 0);
  c.close();
});

test('the server answers nothing but pongs: sends time out one by one, the connection stays', async () => {
  const c = client({ ackTimeout: 1000, pongTimeout: 300 });
  const s = await connected(c);
  const p = c.send('bob', 'x');
  tick(1000);
  s.push({ event: 'pong', data: {} });
  tick(300);
  assert.equal((await p.catch((e) => e)).code, 'timeout');
  assert.equal(c.state, 'connected');
  c.close();
});

test('huge option values do not overflow setTimeout into an immediate fire', async () => {
  const c = client({ ackTimeout: 1e12, pingInterval: 1e12, sendTimeout: 1e12 });
  const s = await connected(c);
  const p = c.send('bob', 'x');
  tick(1000);
  await settle();
  assert.equal(c.pendingCount, 1, 'still waiting for its ack');
  assert.equal(s.frames().filter((f) => f.event === 'ping').length, 0);
  s.ack(s.chats()[0].data.clientMessageId, 'ok');
  assert.equal(await p, 'ok');
  c.close();
});
