// A scripted stand-in for a WebSocket (the WHATWG interface the client uses), driven from the
// server's side by the unit tests.

export class FakeSocket {
  static instances = [];

  static reset() {
    FakeSocket.instances = [];
  }

  static get last() {
    return FakeSocket.instances[FakeSocket.instances.length - 1];
  }

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedByClient = null;
    this.terminated = false;
    this.binaryType = 'blob';
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    FakeSocket.instances.push(this);
  }

  // --- what the client calls
  send(text) {
    if (this.readyState === 0) throw new Error('InvalidStateError: still connecting');
    if (this.readyState !== 1) return; // browsers drop data on a closing socket
    if (this.throwOnSend) throw new Error(this.throwOnSend);
    this.sent.push(text);
  }

  close(code, reason) {
    this.closedByClient = { code, reason };
    this.readyState = 2;
  }

  terminate() {
    this.terminated = true;
    this.readyState = 3;
  }

  // --- what the server does
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  /** Opens and sends `connected`. */
  accept(info = {}) {
    this.open();
    this.push({
      event: 'connected',
      data: { userId: 'alice', connectionId: 'c1', instanceId: 'n1', expiresAt: 4102444800, ...info },
    });
  }

  push(frame) {
    this.onmessage?.({ data: typeof frame === 'string' || frame instanceof ArrayBuffer ? frame : JSON.stringify(frame) });
  }

  ack(cmid, id = `id-${cmid}`) {
    this.push({ event: 'ack', data: { id, clientMessageId: cmid } });
  }

  serverClose(code, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }

  /** A refused upgrade as the `ws` package reports it (an error naming the status, then 1006). */
  refuse(status) {
    this.onerror?.({ message: `Unexpected server response: ${status}` });
    this.readyState = 3;
    this.onclose?.({ code: 1006, reason: '' });
  }

  /** A refused upgrade as a browser reports it: nothing but 1006. */
  refuseSilently() {
    this.onerror?.({});
    this.readyState = 3;
    this.onclose?.({ code: 1006, reason: '' });
  }

  frames() {
    return this.sent.map((t) => JSON.parse(t));
  }

  chats() {
    return this.frames().filter((f) => f.event !== 'ping');
  }
}
