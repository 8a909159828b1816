// Just enough of RESP (the Redis protocol) to list and delete the keys the broker wrote under a prefix.
import net from 'node:net';

/** Parses one RESP reply from `buf` at `pos`; returns [value, nextPos] or null if incomplete. */
function parse(buf, pos) {
  const end = buf.indexOf('\r\n', pos);
  if (end < 0) return null;
  const type = String.fromCharCode(buf[pos]);
  const line = buf.toString('utf8', pos + 1, end);
  const next = end + 2;
  switch (type) {
    case '+':
      return [line, next];
    case '-':
      return [new Error(line), next];
    case ':':
      return [Number(line), next];
    case '$': {
      const len = Number(line);
      if (len < 0) return [null, next];
      if (buf.length < next + len + 2) return null;
      return [buf.toString('utf8', next, next + len), next + len + 2];
    }
    case '*': {
      const count = Number(line);
      if (count < 0) return [null, next];
      const items = [];
      let at = next;
      for (let i = 0; i < count; i += 1) {
        const item = parse(buf, at);
        if (!item) return null;
        items.push(item[0]);
        [, at] = item;
      }
      return [items, at];
    }
    default:
      throw new Error(`unexpected RESP type ${JSON.stringify(type)}`);
  }
}

class RedisClient {
  #socket;
  #buffer = Buffer.alloc(0);
  #waiting = [];

  constructor(socket) {
    this.#socket = socket;
    socket.on('data', (chunk) => {
      this.#buffer = Buffer.concat([this.#buffer, chunk]);
      for (;;) {
        const parsed = this.#waiting.length ? parse(this.#buffer, 0) : null;
        if (!parsed) break;
        this.#buffer = this.#buffer.subarray(parsed[1]);
        const { resolve, reject } = this.#waiting.shift();
        if (parsed[0] instanceof Error) reject(parsed[0]);
        else resolve(parsed[0]);
      }
    });
    socket.on('error', (e) => {
      for (const w of this.#waiting.splice(0)) w.reject(e);
    });
    socket.on('close', () => {
      for (const w of this.#waiting.splice(0)) w.reject(new Error('the Redis connection closed'));
    });
  }

  /** Sends one command; rejects when the connection is gone or no reply comes within `timeoutMs`. */
  command(...args) {
    const timeoutMs = 10_000;
    const parts = [`*${args.length}\r\n`];
    for (const arg of args) {
      const s = String(arg);
      parts.push(`$${Buffer.byteLength(s)}\r\n${s}\r\n`);
    }
    if (this.#socket.destroyed) return Promise.reject(new Error('the Redis connection is closed'));
    return new Promise((resolve, reject) => {
      // A time limit per command, not an idle timeout on the socket: the connection may rightly sit
      // idle for a long time between the test's first use and the clean-up.
      const timer = setTimeout(() => {
        this.#socket.destroy(new Error(`Redis did not answer ${args[0]} within ${timeoutMs} ms`));
      }, timeoutMs);
      const settle = (fn) => (value) => {
        clearTimeout(timer);
        fn(value);
      };
      this.#waiting.push({ resolve: settle(resolve), reject: settle(reject) });
      this.#socket.write(parts.join(''));
    });
  }

  close() {
    this.#socket.end();
  }
}

/** Connects to a `redis://[[user]:password@]host[:port][/db]` URL. */
export async function connectRedis(redisUrl) {
  const url = new URL(redisUrl);
  if (url.protocol !== 'redis:') throw new Error(`only redis:// URLs are supported here, not ${url.protocol}`);
  const socket = net.connect({ host: url.hostname.replace(/^\[|\]$/g, '') || '127.0.0.1', port: Number(url.port || 6379) });
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  const client = new RedisClient(socket);
  if (url.password) {
    const password = decodeURIComponent(url.password);
    await (url.username ? client.command('AUTH', decodeURIComponent(url.username), password) : client.command('AUTH', password));
  }
  const db = url.pathname.replace(/^\//, '');
  if (db) await client.command('SELECT', db);
  return client;
}

/** All keys that start with `prefix` (which must contain no glob characters). */
export async function keysWithPrefix(client, prefix) {
  const keys = [];
  let cursor = '0';
  do {
    const [next, batch] = await client.command('SCAN', cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
    cursor = next;
    keys.push(...batch);
  } while (cursor !== '0');
  return keys;
}

/** Deletes every key that starts with `prefix`; returns how many there were. */
export async function deleteKeysWithPrefix(client, prefix) {
  const keys = await keysWithPrefix(client, prefix);
  for (let i = 0; i < keys.length; i += 500) await client.command('DEL', ...keys.slice(i, i + 500));
  return keys.length;
}
