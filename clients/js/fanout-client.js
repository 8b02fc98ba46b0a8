// fanout-client: a WebSocket client for fanout (https://github.com/… see README.md).
// Zero dependencies, one ES module, for browsers and Node >= 20 (pass `WebSocket` where there
// is no global one, e.g. from the `ws` package). The protocol it speaks is in
// docs/protocol.md §2-§6 of the fanout repository; the choices it makes are in README.md beside this file.

/** @typedef {'disconnected' | 'connecting' | 'connected'} State */

const DEFAULTS = {
  tokenTransport: 'bearer',
  reconnect: { minDelay: 100, baseDelay: 1000, maxDelay: 30000, factor: 2 },
  connectTimeout: 15000,
  ackTimeout: 10000,
  sendTimeout: 60000,
  pingInterval: 15000,
  pongTimeout: 10000,
  stableAfter: 5000,
  refreshBefore: 30000,
  refreshOverlap: 2000,
  maxAuthFailures: 3,
  maxQueue: 1000,
  dedupeSize: 1000,
  maxMessageBytes: 65536,
  rateLimit: { perSecond: 18, burst: 40 },
  probe: true,
};

/** setTimeout's largest delay (a larger one fires at once). */
const MAX_TIMER = 0x7fffffff;
/** Close code this client uses when it drops a socket itself (dead, or no `connected` in time). */
export const CLIENT_CLOSE_CODE = 4000;

/** Error codes a failed send or a stopped client can carry. */
const RETRYABLE = new Set(['rate_limited', 'unavailable', 'timeout', 'queue_full', 'closed']);

/** A failure with a machine-readable `code`: the server's `error` code, or one of this client's. */
export class FanoutError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {object} [extra] clientMessageId, closeCode, status, fatal, cause
   */
  constructor(code, message, extra = {}) {
    super(message, extra.cause !== undefined ? { cause: extra.cause } : undefined);
    this.name = 'FanoutError';
    this.code = code;
    for (const k of ['clientMessageId', 'closeCode', 'status', 'fatal']) {
      if (extra[k] !== undefined) this[k] = extra[k];
    }
  }
  /** Whether sending again (with the same clientMessageId) may succeed. */
  get retryable() {
    return RETRYABLE.has(this.code);
  }
}

/**
 * Delay before reconnect attempt `attempt` (0 for the first): "full jitter" between `minDelay`
 * and the exponential ceiling min(maxDelay, baseDelay * factor^attempt).
 */
export function backoffDelay(attempt, o = DEFAULTS.reconnect, random = Math.random) {
  const min = Math.max(0, o.minDelay);
  const ceiling = Math.max(min, Math.min(o.maxDelay, o.baseDelay * Math.pow(o.factor, attempt)));
  return min + random() * (ceiling - min);
}

/** What a close code means, for people. */
export function describeClose(code) {
  switch (code) {
    case 1000: return 'closed normally';
    case 1001: return 'instance shutting down or idle timeout';
    case 1006: return 'connection lost';
    case 1009: return 'message too big for the server (--max-message-bytes)';
    case 1011: return 'server error';
    case 1013: return 'broker unavailable, try again later';
    case 4001: return 'token expired';
    case 4008: return 'too slow: the outbound queue overflowed (slow consumer)';
    case CLIENT_CLOSE_CODE: return 'dropped by the client';
    default: return 'closed';
  }
}

function clampDelay(ms) {
  return Math.min(Math.max(0, Number(ms) || 0), MAX_TIMER);
}

function isEnvelope(d) {
  return d !== null && typeof d === 'object' && typeof d.id === 'string' && typeof d.from === 'string'
    && 'message' in d && typeof d.sentAt === 'number';
}

function utf8Length(s) {
  if (typeof TextEncoder !== 'undefined') return new TextEncoder().encode(s).length;
  return unescape(encodeURIComponent(s)).length;
}

function randomPrefix() {
  const c = globalThis.crypto;
  if (c && typeof c.getRandomValues === 'function') {
    const b = c.getRandomValues(new Uint8Array(9));
    return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  }
  return Math.random().toString(16).slice(2) + Date.now().toString(16);
}

/** One WebSocket and what belongs to it. */
class Conn {
  constructor(sock, token) {
    this.sock = sock;
    this.token = token;
    this.opened = false;
    this.ready = false;
    this.closed = false;
    this.retiring = false;
    this.info = null;
    this.connectedAt = 0;
    this.lastIn = Date.now();
    this.pingOutstanding = false;
    this.pingSentAt = 0;
    this.errorMessage = '';
    this.timers = new Set();
  }
  after(ms, fn) {
    if (this.closed) return null; // a closed connection keeps no timer (and no process) alive
    const t = setTimeout(() => { this.timers.delete(t); fn(); }, clampDelay(ms));
    this.timers.add(t);
    return t;
  }
  clearTimers() {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }
}

export class Client {
  /**
   * @param {object} options see index.d.ts (ClientOptions)
   */
  constructor(options) {
    if (!options || (typeof options.url !== 'string' && typeof options.url !== 'function')) {
      throw new TypeError('fanout-client: `url` (string or function) is required');
    }
    if (typeof options.getToken !== 'function') {
      throw new TypeError('fanout-client: `getToken` (async () => string) is required');
    }
    const o = { ...DEFAULTS, ...options };
    o.reconnect = { ...DEFAULTS.reconnect, ...(options.reconnect || {}) };
    o.rateLimit = options.rateLimit === null || options.rateLimit === false
      ? null : { ...DEFAULTS.rateLimit, ...(options.rateLimit || {}) };
    this._o = o;
    this._random = typeof options.random === 'function' ? options.random : Math.random;
    /** @type {State} */
    this.state = 'disconnected';
    /** The server's `connected` data of the current connection, or null. */
    this.info = null;
    /** Counters, for tests and dashboards. */
    this.stats = {
      connects: 0, refreshes: 0, sent: 0, resent: 0, duplicatesDropped: 0, deadConnections: 0, tokenCalls: 0,
    };
    this._listeners = new Map();
    this._active = false;
    this._gen = 0; // bumped by connect()/close(): stale async work checks it
    this._conn = null; // the primary connection (opening or ready)
    this._next = null; // a make-before-break refresh connection, while it opens
    this._retiring = new Set();
    this._attempt = 0;
    this._authFailures = 0;
    this._fatalStreak = 0;
    this._refreshAttempt = 0;
    this._reconnectTimer = null;
    this._reconnectAt = 0;
    this._flushTimer = null;
    this._pending = new Map(); // clientMessageId -> pending send, in send order
    this._seen = new Set();
    this._idPrefix = randomPrefix();
    this._idCounter = 0;
    this._bucket = o.rateLimit ? { tokens: o.rateLimit.burst, at: Date.now() } : null;
    this._waiters = [];
    this._lastError = null;
    this._onOnline = () => {
      if (this._active && this._reconnectTimer !== null) {
        clearTimeout(this._reconnectTimer);
        this._reconnectTimer = null;
        this._startPrimary();
      }
    };
  }

  // ---------------------------------------------------------------------------------------------
  // events

  /** Adds a listener; returns a function that removes it. */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    const s = this._listeners.get(event);
    if (s) s.delete(fn);
  }

  _emit(event, ...args) {
    const s = this._listeners.get(event);
    if (!s) return;
    for (const fn of [...s]) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the connection logic.
        if (typeof globalThis.reportError === 'function') globalThis.reportError(e);
        else console.error('fanout-client: a listener threw', e);
      }
    }
  }

  _setState(s) {
    if (this.state === s) return;
    const old = this.state;
    this.state = s;
    this._emit('state', s, old);
  }

  // ---------------------------------------------------------------------------------------------
  // connecting

  /**
   * Starts connecting (and reconnecting until close()). Resolves with the `connected` data once
   * connected; rejects if the client gives up (e.g. the token is refused N times) or is closed.
   */
  connect() {
    const p = new Promise((resolve, reject) => {
      if (this.state === 'connected' && this.info) resolve(this.info);
      else this._waiters.push({ resolve, reject });
    });
    // `client.connect()` without await is fine: a rejection nobody waits for is not reported
    // as unhandled (it also reaches on('error') and lastError).
    p.catch(() => {});
    if (!this._active) {
      this._active = true;
      this._gen++;
      this._attempt = 0;
      this._authFailures = 0;
      this._fatalStreak = 0;
      this._lastError = null;
      if (typeof globalThis.addEventListener === 'function') globalThis.addEventListener('online', this._onOnline);
      this._startPrimary();
    }
    return p;
  }

  /** Closes the connection for good (until connect() is called again); pending sends reject. */
  close() {
    this._stop(new FanoutError('closed', 'the client was closed'), 1000, 'closed by the client');
  }

  _stop(err, code, reason) {
    const wasActive = this._active;
    this._active = false;
    this._gen++;
    if (typeof globalThis.removeEventListener === 'function') globalThis.removeEventListener('online', this._onOnline);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    clearTimeout(this._flushTimer);
    this._flushTimer = null;
    for (const c of [this._conn, this._next, ...this._retiring]) {
      if (c) this._discard(c, 1000, 'client closed');
    }
    this._conn = null;
    this._next = null;
    this._retiring.clear();
    this.info = null;
    for (const p of [...this._pending.values()]) this._settle(p, null, err);
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) w.reject(err);
    const was = this.state;
    this._setState('disconnected');
    if (wasActive || was !== 'disconnected') {
      this._emit('disconnected', { code, reason, wasConnected: was === 'connected', reconnectIn: null, error: err });
    }
  }

  _fail(err) {
    err.fatal = true;
    this._lastError = err;
    this._emit('error', err);
    this._stop(err, err.closeCode ?? null, err.message);
  }

  /** Why the client stopped by itself, if it did (null while it keeps trying). */
  get lastError() {
    return this._lastError;
  }

  _url() {
    return typeof this._o.url === 'function' ? this._o.url() : this._o.url;
  }

  async _token() {
    this.stats.tokenCalls++;
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`getToken did not answer within ${this._o.connectTimeout} ms`)),
        clampDelay(this._o.connectTimeout));
    });
    try {
      const t = await Promise.race([Promise.resolve().then(() => this._o.getToken()), timeout]);
      if (typeof t !== 'string' || t.trim() === '') throw new Error('getToken returned no token (a non-empty string)');
      return t.trim();
    } finally {
      clearTimeout(timer);
    }
  }

  _newSocket(token) {
    const WS = this._o.WebSocket || globalThis.WebSocket;
    if (typeof WS !== 'function') {
      throw new TypeError('fanout-client: no WebSocket here; pass { WebSocket } (e.g. from the ws package on Node 20)');
    }
    const url = this._url();
    let sock;
    switch (this._o.tokenTransport) {
      case 'query':
        sock = new WS(url + (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(token));
        break;
      case 'protocol':
        sock = new WS(url, token);
        break;
      default:
        // Only `bearer` is echoed in the 101, so the token stays out of response headers.
        sock = new WS(url, ['bearer', token]);
    }
    try { sock.binaryType = 'arraybuffer'; } catch { /* not every implementation has it */ }
    return sock;
  }

  _attach(conn) {
    const s = conn.sock;
    s.onopen = () => { conn.opened = true; conn.lastIn = Date.now(); };
    s.onmessage = (e) => this._onFrame(conn, e.data);
    s.onerror = (e) => {
      const m = e && (e.message || (e.error && e.error.message));
      if (m) conn.errorMessage = String(m);
    };
    s.onclose = (e) => this._onClose(conn, e ? e.code : 1006, (e && e.reason) || '');
  }

  /** Stops listening to a socket and closes it (terminate() where the implementation has it). */
  _discard(conn, code, reason) {
    if (conn.closed) return;
    conn.closed = true;
    conn.clearTimers();
    const s = conn.sock;
    s.onopen = s.onmessage = s.onerror = s.onclose = null;
    try {
      if (code !== 1000 && typeof s.terminate === 'function') s.terminate();
      else s.close(code, reason.slice(0, 120));
    } catch { /* already closed */ }
  }

  async _startPrimary() {
    this._reconnectTimer = null;
    const gen = this._gen;
    this._setState('connecting');
    let token;
    try {
      token = await this._token();
    } catch (e) {
      if (gen !== this._gen || !this._active) return;
      const err = new FanoutError('token_error', `getToken failed: ${e && e.message ? e.message : e}`, { cause: e });
      this._emit('error', err);
      this._retry({ code: null, reason: err.message, wasConnected: false, error: err });
      return;
    }
    if (gen !== this._gen || !this._active) return;
    let sock;
    try {
      sock = this._newSocket(token);
    } catch (e) {
      // No WebSocket, a malformed URL, a token that cannot be a subprotocol: trying again
      // would fail the same way.
      this._fail(new FanoutError('connection_failed', `cannot open a WebSocket: ${e && e.message ? e.message : e}`,
        { cause: e }));
      return;
    }
    const conn = new Conn(sock, token);
    this._conn = conn;
    this._attach(conn);
    conn.after(this._o.connectTimeout, () => {
      if (!conn.ready) this._drop(conn, `no "connected" frame within ${this._o.connectTimeout} ms`);
    });
  }

  /** Drops a socket this client gave up on (dead, or not connected in time) and reconnects. */
  _drop(conn, reason) {
    if (conn.closed) return;
    this._discard(conn, CLIENT_CLOSE_CODE, reason);
    conn.closed = false; // let _onClose do the bookkeeping once
    conn.local = true;
    this._onClose(conn, CLIENT_CLOSE_CODE, reason);
  }

  async _onClose(conn, code, reason) {
    if (conn.closed && !conn.local) return;
    conn.closed = true;
    conn.clearTimers();
    const s = conn.sock;
    s.onopen = s.onmessage = s.onerror = s.onclose = null;
    const now = Date.now();
    const lived = conn.ready ? now - conn.connectedAt : 0;

    // 1009: the server refused a frame of ours as too big; it is the largest one in flight.
    // Resending it would only close the next connection too.
    if (code === 1009) {
      let big = null;
      for (const p of this._pending.values()) {
        if (p.conn === conn && (!big || p.bytes > big.bytes)) big = p;
      }
      if (big) {
        this._settle(big, null, new FanoutError('too_big', 'the server closed the connection with 1009: message too big',
          { clientMessageId: big.cmid, closeCode: 1009 }));
      }
    }
    // What was in flight on this socket goes out again, with the same clientMessageId.
    for (const p of [...this._pending.values()]) {
      if (p.conn !== conn) continue;
      p.conn = null;
      clearTimeout(p.ackTimer);
      p.ackTimer = null;
      if (p.expired) {
        this._settle(p, null, new FanoutError('timeout',
          'no ack before sendTimeout; it may have been delivered: send again with the same clientMessageId',
          { clientMessageId: p.cmid }));
      }
    }

    if (this._retiring.delete(conn)) {
      this._flush();
      return;
    }
    if (conn === this._next) {
      this._next = null;
      this._refreshFailed(`refresh connection closed (${code}${reason ? ': ' + reason : ''})`);
      return;
    }
    if (conn !== this._conn || !this._active) return;
    this._conn = null;
    if (this._next) {
      this._discard(this._next, 1000, 'primary closed');
      this._next = null;
    }
    const gen = this._gen;
    const wasConnected = conn.ready;
    if (wasConnected) this.info = null;
    if (conn.ready && lived >= this._o.stableAfter) {
      this._attempt = 0;
      this._fatalStreak = 0;
    }

    if (!conn.opened && !conn.local) {
      // Refused before the upgrade. Browsers show 1006 whatever the reason; find out whether
      // it was the token (401) or the network / a proxy / a full instance.
      this._setState('disconnected');
      const why = await this._whyRefused(conn);
      if (gen !== this._gen || !this._active) return;
      if (why.status === 401) {
        this._authFailures++;
        const msg = `token refused (401${why.message ? ': ' + why.message : ''})`;
        const err = new FanoutError('unauthorized', msg, { status: 401, closeCode: code });
        if (this._authFailures >= this._o.maxAuthFailures) {
          err.message = `${msg}; gave up after ${this._authFailures} refused tokens in a row`;
          this._fail(err);
          return;
        }
        this._emit('error', err);
        this._retry({ code, reason: msg, wasConnected: false, error: err });
        return;
      }
      const detail = why.status ? `HTTP ${why.status}` : (conn.errorMessage || 'no upgrade');
      this._retry({ code, reason: `handshake failed (${detail})`, wasConnected: false });
      return;
    }

    const info = { code, reason: reason || describeClose(code), wasConnected };
    if (code === 4001) {
      if (conn.ready && lived < 1000) {
        // getToken gave a token that expired at once: that is a refused token too.
        this._authFailures++;
        const err = new FanoutError('unauthorized', 'getToken returned an expired token (4001 at once)',
          { closeCode: 4001 });
        if (this._authFailures >= this._o.maxAuthFailures) {
          err.message += `; gave up after ${this._authFailures} refused tokens in a row`;
          this._fail(err);
          return;
        }
        this._retry({ ...info, error: err });
        return;
      }
      this._retry(info, 0); // a fresh token, at once
      return;
    }
    if (code === 4008 || code === 1009) {
      this._fatalStreak++;
      const err = code === 4008
        ? new FanoutError('slow_consumer', 'the server closed the connection with 4008: this client read too slowly',
          { closeCode: code })
        : new FanoutError('too_big', 'the server closed the connection with 1009: a message was too big',
          { closeCode: code });
      if (this._fatalStreak > 1) {
        err.message += '; it happened again right after reconnecting, so the client stopped';
        this._fail(err);
        return;
      }
      err.message += '; reconnecting once';
      this._emit('error', err);
      this._retry({ ...info, error: err });
      return;
    }
    this._retry(info);
  }

  /** After a refused handshake: the HTTP status if it can be known, and the server's reason. */
  async _whyRefused(conn) {
    // Node's `ws` names the status ("Unexpected server response: 401"); browsers do not.
    const m = /\b([1-5]\d\d)\b/.exec(conn.errorMessage || '');
    const known = m && /response|status/i.test(conn.errorMessage) ? { status: Number(m[1]) } : null;
    if (known && known.status !== 401) return known;
    const fetch = this._o.fetch || globalThis.fetch;
    if (!this._o.probe || typeof fetch !== 'function' || this._o.tokenTransport === 'query') return known || {};
    // The same request without the upgrade: 401 {"message": why} for a bad token, 426 for a
    // good one (so the refusal was something else).
    try {
      const url = this._url().replace(/^ws(s?):/i, 'http$1:');
      const ctl = typeof AbortController === 'function' ? new AbortController() : null;
      const t = setTimeout(() => ctl && ctl.abort(), 5000);
      try {
        const r = await fetch(url, {
          headers: { authorization: `Bearer ${conn.token}` },
          signal: ctl ? ctl.signal : undefined,
          cache: 'no-store',
        });
        let message = '';
        if (r.status === 401) {
          try { message = String((await r.json()).message || ''); } catch { /* not JSON */ }
        }
        // A 401 from the socket stays a 401 even if the probe saw something else meanwhile.
        return known ? { status: 401, message } : { status: r.status, message };
      } finally {
        clearTimeout(t);
      }
    } catch {
      return known || {}; // network down, or a cross-origin page without CORS: unknown
    }
  }

  /** Schedules the next attempt: after `delay`, or after the backoff for this attempt. */
  _retry(info, delay) {
    if (!this._active) return;
    const d = delay ?? backoffDelay(this._attempt, this._o.reconnect, this._random);
    if (delay === undefined) this._attempt++;
    this._setState('disconnected');
    this._emit('disconnected', { ...info, reconnectIn: d });
    clearTimeout(this._reconnectTimer);
    this._reconnectAt = Date.now() + d;
    this._reconnectTimer = setTimeout(() => this._startPrimary(), clampDelay(d));
  }

  // ---------------------------------------------------------------------------------------------
  // token refresh: a new connection with a fresh token before the old token expires; the old one
  // is closed once the new one is connected and the old one's acks are in (make before break).

  _scheduleRefresh(conn) {
    const before = this._o.refreshBefore;
    const exp = conn.info && conn.info.expiresAt;
    if (!before || typeof exp !== 'number') return;
    const remaining = exp * 1000 - Date.now();
    if (remaining <= 2000) return; // too short to refresh ahead: 4001 and a reconnect handle it
    const at = remaining - Math.min(before, remaining / 4);
    if (at > MAX_TIMER) return; // far-future expiry
    conn.after(at, () => this._startRefresh(conn));
  }

  async _startRefresh(conn) {
    if (conn !== this._conn || !conn.ready || this._next || !this._active) return;
    const gen = this._gen;
    let token;
    try {
      token = await this._token();
    } catch (e) {
      if (gen === this._gen && conn === this._conn) {
        this._emit('error', new FanoutError('token_error', `getToken failed: ${e && e.message ? e.message : e}`,
          { cause: e }));
        this._refreshFailed('getToken failed');
      }
      return;
    }
    if (gen !== this._gen || conn !== this._conn || this._next || !this._active) return;
    if (token === conn.token) return; // the same token again: nothing to gain; 4001 will tell
    let sock;
    try {
      sock = this._newSocket(token);
    } catch {
      this._refreshFailed('cannot open a WebSocket');
      return;
    }
    const next = new Conn(sock, token);
    this._next = next;
    this._attach(next);
    next.after(this._o.connectTimeout, () => {
      if (!next.ready && next === this._next) {
        this._discard(next, CLIENT_CLOSE_CODE, 'refresh not connected in time');
        this._next = null;
        this._refreshFailed('no "connected" frame in time');
      }
    });
  }

  _refreshFailed(why) {
    const conn = this._conn;
    if (!conn || !conn.ready || !this._active) return;
    const d = backoffDelay(this._refreshAttempt++, this._o.reconnect, this._random);
    const exp = conn.info && conn.info.expiresAt;
    if (typeof exp === 'number' && Date.now() + d >= exp * 1000) return; // 4001 comes first
    this._emit('debug', `token refresh: ${why}; retrying in ${Math.round(d)} ms`);
    conn.after(d, () => this._startRefresh(conn));
  }

  _swap(next) {
    const old = this._conn;
    this._next = null;
    this._conn = next;
    this._refreshAttempt = 0;
    this.info = next.info;
    this.stats.refreshes++;
    this._resetBucket();
    if (old) {
      old.retiring = true;
      old.clearTimers();
      this._retiring.add(old);
      // A message published just before the new connection's subscription was confirmed is
      // still on its way to the old one: keep it open a little (refreshOverlap), and until its
      // acks are in; after ackTimeout it goes anyway.
      const overlap = clampDelay(this._o.refreshOverlap);
      old.graceUntil = Date.now() + overlap;
      old.after(Math.max(overlap, this._o.ackTimeout), () => this._retire(old, true));
      old.after(overlap, () => this._retire(old, false));
    }
    const noLater = old && old.info && next.info.expiresAt <= old.info.expiresAt;
    if (!noLater) this._scheduleRefresh(next);
    this._emit('refreshed', next.info);
    this._flush();
  }

  /** Closes a retiring connection once nothing waits for its acks (or when forced). */
  _retire(old, force) {
    if (old.closed) return;
    if (!force) {
      if (Date.now() < (old.graceUntil || 0)) return;
      for (const p of this._pending.values()) if (p.conn === old) return;
    }
    this._discard(old, 1000, 'token refreshed');
    this._onClose(Object.assign(old, { local: true }), 1000, 'token refreshed');
  }

  // ---------------------------------------------------------------------------------------------
  // frames

  _onFrame(conn, data) {
    if (conn.closed) return;
    conn.lastIn = Date.now();
    conn.pingOutstanding = false;
    if (typeof data !== 'string') {
      this._emit('raw', data, undefined);
      return;
    }
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      this._emit('raw', data, undefined);
      return;
    }
    const d = f !== null && typeof f === 'object' && !Array.isArray(f) ? f.data : undefined;
    const dd = d !== null && typeof d === 'object' && !Array.isArray(d) ? d : null;
    switch (f && f.event) {
      case 'connected':
        if (dd && typeof dd.userId === 'string') this._onConnected(conn, dd);
        else this._emit('raw', data, f);
        return;
      case 'pong':
        return;
      case 'ack': {
        const p = dd && typeof dd.clientMessageId === 'string' ? this._pending.get(dd.clientMessageId) : undefined;
        if (p) {
          this._settle(p, typeof dd.id === 'string' ? dd.id : null, null);
          if (conn.retiring) this._retire(conn, false);
          this._flush();
        }
        return; // an ack for nothing pending (late, or a duplicate) is ignored
      }
      case 'error': {
        const code = dd && typeof dd.code === 'string' ? dd.code : 'unknown';
        const message = dd && typeof dd.message === 'string' ? dd.message : code;
        const cmid = dd && typeof dd.clientMessageId === 'string' ? dd.clientMessageId : undefined;
        const p = cmid !== undefined ? this._pending.get(cmid) : undefined;
        const err = new FanoutError(code, message, { clientMessageId: cmid });
        if (p) {
          this._settle(p, null, err);
          if (conn.retiring) this._retire(conn, false);
          this._flush();
        } else {
          this._emit('error', err);
        }
        return;
      }
      case 'chat_message':
        if (dd && isEnvelope(dd)) {
          if (this._remember(dd.id)) {
            this._emit('message', dd);
          } else {
            this.stats.duplicatesDropped++;
          }
          return;
        }
        this._emit('raw', data, f);
        return;
      default:
        this._emit('raw', data, f);
    }
  }

  /** True the first time an id is seen; a bounded memory of recent ids. */
  _remember(id) {
    if (this._seen.has(id)) return false;
    this._seen.add(id);
    if (this._seen.size > this._o.dedupeSize) this._seen.delete(this._seen.values().next().value);
    return true;
  }

  _onConnected(conn, d) {
    if (conn.ready) return; // a second `connected` on one socket: ignored
    conn.ready = true;
    conn.connectedAt = Date.now();
    conn.info = d;
    conn.clearTimers();
    this._armIdle(conn);
    // A token that lasts at least a second was good: refused tokens are counted afresh.
    conn.after(1000, () => { if (conn === this._conn) this._authFailures = 0; });
    if (conn === this._next) {
      this._swap(conn);
      return;
    }
    if (conn !== this._conn) return;
    this.stats.connects++;
    this.info = d;
    this._refreshAttempt = 0;
    this._resetBucket();
    this._setState('connected');
    this._emit('connected', d);
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) w.resolve(d);
    this._scheduleRefresh(conn);
    this._flush();
  }

  // ---------------------------------------------------------------------------------------------
  // dead connections: no frame for pingInterval -> {"event":"ping"}; nothing within pongTimeout
  // -> the socket is dropped and replaced.

  _armIdle(conn) {
    if (this._o.pingInterval) this._idleIn(conn, this._o.pingInterval);
  }

  /** One liveness timer per connection. */
  _idleIn(conn, ms) {
    clearTimeout(conn.idleTimer);
    conn.timers.delete(conn.idleTimer);
    conn.idleTimer = conn.after(ms, () => this._idleCheck(conn));
  }

  _idleCheck(conn) {
    const { pingInterval, pongTimeout } = this._o;
    if (conn.closed) return;
    const now = Date.now();
    if (conn.pingOutstanding) {
      if (now - conn.pingSentAt >= pongTimeout) {
        this.stats.deadConnections++;
        if (conn === this._conn) this._drop(conn, `no traffic and no pong within ${pongTimeout} ms`);
        else this._retire(conn, true);
        return;
      }
      this._idleIn(conn, conn.pingSentAt + pongTimeout - now);
      return;
    }
    if (!pingInterval) return;
    const idle = now - conn.lastIn;
    if (idle >= pingInterval) this._ping(conn);
    else this._idleIn(conn, pingInterval - idle);
  }

  /** Sends a ping unless one is outstanding; no frame at all within pongTimeout = dead. */
  _ping(conn) {
    if (conn.closed || conn.pingOutstanding) return;
    conn.pingOutstanding = true;
    conn.pingSentAt = Date.now();
    this._write(conn, '{"event":"ping","data":{}}');
    this._idleIn(conn, this._o.pongTimeout);
  }

  /** Writes a frame; a socket that refuses is treated as dead. */
  _write(conn, text) {
    const s = conn.sock;
    if (conn.closed || s.readyState !== 1) return false;
    try {
      s.send(text);
      return true;
    } catch (e) {
      if (conn === this._conn) this._drop(conn, `send failed: ${e && e.message ? e.message : e}`);
      return false;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // sending

  /** Sends `message` (any JSON value) to one user; resolves with the server's message id. */
  send(to, message, options) {
    return this._enqueue('send_chat_message_to_participant', { participantId: to, message }, 1, options);
  }

  /** Sends to 1–100 users; resolves with the server's message id once handed over for all. */
  sendToMany(to, message, options) {
    const cost = Array.isArray(to) ? Math.max(1, new Set(to).size) : 1;
    return this._enqueue('send_chat_message_to_many_participants', { participantIds: to, message }, cost, options);
  }

  /** Sends to every connected user (the token needs scope `broadcast`). */
  broadcast(message, options) {
    return this._enqueue('send_chat_message_to_all_participants', { message }, 1, options);
  }

  /** A fresh clientMessageId: a random prefix per Client and a counter (unique per sender). */
  newClientMessageId() {
    return `${this._idPrefix}-${++this._idCounter}`;
  }

  /** Sends not yet acknowledged (queued or in flight). */
  get pendingCount() {
    return this._pending.size;
  }

  _enqueue(event, data, cost, options = {}) {
    const cmid = options.clientMessageId !== undefined ? String(options.clientMessageId) : this.newClientMessageId();
    const existing = this._pending.get(cmid);
    if (existing) return existing.promise; // the same message again: one send, one answer
    if (this._pending.size >= this._o.maxQueue) {
      return Promise.reject(new FanoutError('queue_full',
        `${this._pending.size} messages already wait for an ack (maxQueue)`, { clientMessageId: cmid }));
    }
    const text = JSON.stringify({ event, data: { ...data, clientMessageId: cmid } });
    const bytes = utf8Length(text);
    if (bytes > this._o.maxMessageBytes) {
      return Promise.reject(new FanoutError('too_big',
        `the frame is ${bytes} bytes, more than maxMessageBytes (${this._o.maxMessageBytes})`, { clientMessageId: cmid }));
    }
    const p = { cmid, text, bytes, cost, conn: null, writes: 0, ackTimer: null, sendTimer: null };
    p.promise = new Promise((resolve, reject) => { p.resolve = resolve; p.reject = reject; });
    this._pending.set(cmid, p);
    const total = options.timeout ?? this._o.sendTimeout;
    if (total > 0) {
      p.sendTimer = setTimeout(() => {
        if (p.conn && !p.conn.closed) {
          p.expired = true; // in flight: the ack (or its timeout) decides; not resent after a close
          return;
        }
        this._settle(p, null, new FanoutError('timeout', `not sent within ${total} ms (not connected)`,
          { clientMessageId: cmid }));
      }, clampDelay(total));
    }
    this._flush();
    return p.promise;
  }

  _settle(p, id, err) {
    if (this._pending.get(p.cmid) !== p) return;
    this._pending.delete(p.cmid);
    clearTimeout(p.ackTimer);
    clearTimeout(p.sendTimer);
    if (err) p.reject(err);
    else p.resolve(id);
  }

  _resetBucket() {
    if (this._bucket) {
      this._bucket.tokens = this._o.rateLimit.burst;
      this._bucket.at = Date.now();
    }
  }

  /** Takes `cost` tokens, or returns how many ms to wait for them. */
  _take(cost) {
    const b = this._bucket;
    if (!b) return 0;
    const { perSecond, burst } = this._o.rateLimit;
    const now = Date.now();
    b.tokens = Math.min(burst, b.tokens + ((now - b.at) / 1000) * perSecond);
    b.at = now;
    const need = Math.min(cost, burst);
    if (b.tokens >= need) {
      b.tokens -= need;
      return 0;
    }
    return Math.max(1, Math.ceil(((need - b.tokens) / perSecond) * 1000));
  }

  /**
   * No ack in time. A dead socket is the likely cause: ping first, so a dead one is replaced and
   * the message resent; only when the socket answers but the ack still does not come, reject.
   */
  _ackOverdue(p) {
    const c = p.conn;
    if (c && !c.closed && !p.probed) {
      p.probed = true;
      this._ping(c);
      p.ackTimer = setTimeout(() => this._ackOverdue(p), clampDelay(this._o.pongTimeout));
      return;
    }
    this._settle(p, null, new FanoutError('timeout',
      `no ack within ${this._o.ackTimeout} ms; it may still be delivered: send again with the same clientMessageId`,
      { clientMessageId: p.cmid }));
  }

  /** Writes pending sends, in order, to the current connection. */
  _flush() {
    const c = this._conn;
    if (!c || !c.ready || c.closed || c.sock.readyState !== 1) return;
    for (const p of [...this._pending.values()]) {
      if (p.conn === c) continue;
      if (p.conn && !p.conn.closed) break; // in flight on a retiring connection: keep the order
      if (this._pending.get(p.cmid) !== p) continue;
      const wait = this._take(p.cost);
      if (wait > 0) {
        if (this._flushTimer === null) {
          this._flushTimer = setTimeout(() => { this._flushTimer = null; this._flush(); }, clampDelay(wait));
        }
        return;
      }
      if (!this._write(c, p.text)) return;
      this.stats.sent++;
      if (p.writes > 0) this.stats.resent++;
      p.writes++;
      p.conn = c;
      clearTimeout(p.ackTimer);
      p.probed = false;
      p.ackTimer = setTimeout(() => this._ackOverdue(p), clampDelay(this._o.ackTimeout));
    }
  }
}

export default Client;
