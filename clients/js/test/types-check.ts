// Compiled with `tsc --noEmit` (npm run typecheck): the hand-written types describe real usage.
import WebSocket from 'ws';
import Client, { FanoutError, backoffDelay, describeClose, type Envelope, type ConnectedInfo } from '../index.js';

const client = new Client({
  url: 'wss://chat.example.com/entrypoint',
  getToken: async () => 'token',
  WebSocket,
  reconnect: { maxDelay: 10_000 },
  rateLimit: null,
});
client.on('message', (m: Envelope) => console.log(m.from, m.message, m.sentAt, m.clientMessageId));
client.on('raw', (data, json) => console.log(typeof data, json));
client.on('state', (s, prev) => console.log(prev, '->', s));
client.on('disconnected', (d) => console.log(d.code, d.reconnectIn, d.error?.code));
client.on('error', (e: FanoutError) => console.log(e.code, e.fatal, e.retryable));
const off = client.on('connected', (i: ConnectedInfo) => console.log(i.userId, i.expiresAt));
off();
async function main(): Promise<void> {
  const info: ConnectedInfo = await client.connect();
  const id: string = await client.send('bob', { text: 'hi' }, { clientMessageId: client.newClientMessageId() });
  await client.sendToMany(['a', 'b'], 'hey');
  await client.broadcast('all', { timeout: 5000 });
  try {
    await client.send('not/valid', 'x');
  } catch (e) {
    if (e instanceof FanoutError && e.code === 'invalid_participant') console.log(e.clientMessageId);
  }
  const d: number = backoffDelay(3);
  console.log(info, id, d, describeClose(4001), client.state, client.stats.resent, client.pendingCount);
  client.close();
}
void main;
