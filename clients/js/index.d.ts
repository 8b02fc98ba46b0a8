// Types for fanout-client (hand-written; the module is plain JavaScript).

export type State = 'disconnected' | 'connecting' | 'connected';

/** Codes a FanoutError can carry: the server's `error` codes, then this client's own. */
export type ErrorCode =
  | 'rate_limited'
  | 'forbidden'
  | 'unavailable'
  | 'bad_json'
  | 'invalid_participant'
  | 'too_many_recipients'
  | 'unknown_event'
  /** No ack in time (the message may still have been delivered: resend with the same clientMessageId). */
  | 'timeout'
  /** maxQueue messages already wait for an ack. */
  | 'queue_full'
  /** Larger than maxMessageBytes, or the server closed with 1009 because of it. */
  | 'too_big'
  /** close() was called. */
  | 'closed'
  /** The token was refused (401 at the handshake, or 4001 at once) maxAuthFailures times in a row. */
  | 'unauthorized'
  /** getToken threw, timed out or returned no string. */
  | 'token_error'
  /** The server closed with 4008 twice in a row. */
  | 'slow_consumer'
  /** No WebSocket could be made (e.g. Node 20 without the `WebSocket` option). */
  | 'connection_failed'
  | (string & {});

export declare class FanoutError extends Error {
  readonly name: 'FanoutError';
  readonly code: ErrorCode;
  /** The send this error answers, when there is one. */
  readonly clientMessageId?: string;
  /** The WebSocket close code behind it (4001, 4008, 1009, 1006). */
  readonly closeCode?: number;
  /** The HTTP status of a refused handshake (401). */
  readonly status?: number;
  /** True when the client stopped because of it (it no longer reconnects). */
  fatal?: boolean;
  /** Whether sending again with the same clientMessageId may succeed. */
  readonly retryable: boolean;
  constructor(code: ErrorCode, message: string, extra?: { clientMessageId?: string; closeCode?: number; status?: number; fatal?: boolean; cause?: unknown });
}

/** The server's `connected` frame: the subscription to the user's topic is confirmed. */
export interface ConnectedInfo {
  userId: string;
  connectionId: string;
  instanceId: string;
  /** Unix seconds. */
  expiresAt: number;
}

/** A chat message as fanout delivers it (`chat_message` envelope). */
export interface Envelope<M = unknown> {
  /** UUID; derived from (from, clientMessageId) when the sender gave one, so a resend has the same id. */
  id: string;
  /** The sender's verified user id. */
  from: string;
  /** The recipient, the recipient list (sendToMany), or null for a broadcast. */
  to: string | string[] | null;
  message: M;
  /** Unix milliseconds. */
  sentAt: number;
  clientMessageId?: string;
}

export interface DisconnectInfo {
  /** WebSocket close code (1006 for a lost connection or a refused handshake; 4000 when this client dropped it); null when no socket was made. */
  code: number | null;
  reason: string;
  /** Whether this connection had reached `connected`. */
  wasConnected: boolean;
  /** Milliseconds until the next try; null when the client stopped (close(), or a fatal error). */
  reconnectIn: number | null;
  error?: FanoutError;
}

export interface ReconnectOptions {
  /** Shortest wait before a retry, ms (default 100). Never zero by default: no reconnect storm. */
  minDelay?: number;
  /** Ceiling of the first retry, ms (default 1000); retry n waits a random time in [minDelay, min(maxDelay, baseDelay * factor^n)]. */
  baseDelay?: number;
  /** Cap, ms (default 30000). */
  maxDelay?: number;
  /** Growth per failed try (default 2). */
  factor?: number;
}

/** The minimal WebSocket the client needs (browsers' WebSocket, `ws`, undici's). */
export interface WebSocketLike {
  readonly readyState: number;
  binaryType?: string;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onerror: ((ev: any) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  terminate?(): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ClientOptions {
  /** The WebSocket endpoint, e.g. `wss://chat.example.com/entrypoint`; a function is asked before each connect. */
  url: string | (() => string);
  /** Called before every connect (and token refresh): your login service. */
  getToken: () => string | Promise<string>;
  /** A WebSocket constructor where there is no global one (Node 20: `import WebSocket from 'ws'`). */
  WebSocket?: WebSocketConstructor | (new (...args: any[]) => any);
  /** How the token travels: `bearer` (default: subprotocols `bearer, <token>`; only `bearer` is echoed), `protocol` (the token as the subprotocol, as the seed tutorial did), or `query` (`?token=`). */
  tokenTransport?: 'bearer' | 'protocol' | 'query';
  reconnect?: ReconnectOptions;
  /** From opening the socket to the `connected` frame (and for getToken), ms (default 15000). */
  connectTimeout?: number;
  /** From writing a message to its ack, ms (default 10000); then a ping decides: dead socket → resend, live → `timeout`. */
  ackTimeout?: number;
  /** Longest a send may wait in the queue while disconnected, ms (default 60000; 0 = no limit). */
  sendTimeout?: number;
  /** Silence after which the client pings, ms (default 15000; 0 = never). */
  pingInterval?: number;
  /** No frame at all this long after a ping: the connection is dead and replaced, ms (default 10000). */
  pongTimeout?: number;
  /** A connection that lasted this long resets the backoff and the 4008/1009 rule, ms (default 5000). */
  stableAfter?: number;
  /** Open a new connection with a fresh token this long before `expiresAt` (at most a quarter of the lifetime), ms (default 30000; 0 = only after 4001). */
  refreshBefore?: number;
  /** After a refresh, how long the old connection stays open for messages still on their way to it, ms (default 2000). */
  refreshOverlap?: number;
  /** Refused tokens in a row before the client stops with `unauthorized` (default 3). */
  maxAuthFailures?: number;
  /** Sends waiting for an ack, at most (default 1000); beyond it `queue_full`. */
  maxQueue?: number;
  /** How many recent message ids the duplicate filter remembers (default 1000). */
  dedupeSize?: number;
  /** Largest frame the client sends, bytes (default 65536, the server's --max-message-bytes). */
  maxMessageBytes?: number;
  /** Client-side pacing so queued sends do not trip the server's limit (default 18/s, burst 40); null to turn off. */
  rateLimit?: { perSecond?: number; burst?: number } | null;
  /** After a refused handshake, ask the server why (GET on the same URL with the token; default true). */
  probe?: boolean;
  /** fetch for that probe (default: the global one). */
  fetch?: (url: string, init?: any) => Promise<{ status: number; json(): Promise<any> }>;
  /** Random numbers for the jitter (tests). */
  random?: () => number;
}

export interface SendOptions {
  /** Your own id for this message (unique per sender!); pass the same one to retry a send safely. */
  clientMessageId?: string;
  /** Overrides sendTimeout for this message. */
  timeout?: number;
}

export interface ClientEvents {
  state: (state: State, previous: State) => void;
  connected: (info: ConnectedInfo) => void;
  disconnected: (info: DisconnectInfo) => void;
  /** A new connection with a fresh token replaced the old one; the state stayed `connected`. */
  refreshed: (info: ConnectedInfo) => void;
  message: (envelope: Envelope) => void;
  /** A frame that is not a fanout envelope (e.g. injected with mosquitto_pub): its text or bytes, and its JSON if it parses. */
  raw: (data: string | ArrayBuffer | Blob | Uint8Array, json: unknown) => void;
  /** Non-fatal problems (a refused token, getToken failing, an error frame for no send) and the fatal one (`fatal: true`). */
  error: (error: FanoutError) => void;
  debug: (text: string) => void;
}

export interface ClientStats {
  connects: number;
  refreshes: number;
  sent: number;
  resent: number;
  duplicatesDropped: number;
  deadConnections: number;
  tokenCalls: number;
}

export declare class Client {
  constructor(options: ClientOptions);
  readonly state: State;
  /** The current connection's `connected` data, or null. */
  readonly info: ConnectedInfo | null;
  readonly stats: ClientStats;
  /** Why the client stopped by itself (null while it keeps trying). */
  readonly lastError: FanoutError | null;
  /** Sends not yet acknowledged (queued or in flight). */
  readonly pendingCount: number;
  /** Starts connecting and keeps reconnecting until close(); resolves on `connected`, rejects if the client gives up or is closed. */
  connect(): Promise<ConnectedInfo>;
  /** Closes for good (until connect()); pending sends reject with `closed`. */
  close(): void;
  on<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): () => void;
  off<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): void;
  /** To one user; resolves with the server's message id on `ack`. */
  send(to: string, message: unknown, options?: SendOptions): Promise<string>;
  /** To 1–100 users. */
  sendToMany(to: string[], message: unknown, options?: SendOptions): Promise<string>;
  /** To every connected user (the token needs scope `broadcast`). */
  broadcast(message: unknown, options?: SendOptions): Promise<string>;
  /** A fresh clientMessageId (a random prefix per Client, then a counter). */
  newClientMessageId(): string;
}

/** The reconnect delay for retry `attempt` (0 = first): full jitter in [minDelay, min(maxDelay, baseDelay * factor^attempt)]. */
export declare function backoffDelay(attempt: number, options?: Required<ReconnectOptions>, random?: () => number): number;
/** What a close code means, in words. */
export declare function describeClose(code: number): string;
/** The close code the client uses when it drops a socket itself (4000). */
export declare const CLIENT_CLOSE_CODE: number;

export default Client;
