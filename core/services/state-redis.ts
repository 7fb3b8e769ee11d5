import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { createRequire } from 'node:module';
import type { RedisClientType } from 'redis';
import { Holdings } from './holdings.js';
import { RATE_BUCKETS, StateError, type StateStore } from './state.js';

/*
 * The Redis State backend, for servers on several machines (or when the embedded file is not
 * wanted). Every operation is one Lua script, which Redis runs atomically: nothing another client
 * sends can come in between its reads and writes, so the contract's atomicity holds across every
 * process and machine that uses the server.
 *
 * Layout, under the configured prefix (`petrel:` by default), for a State key K:
 *   <prefix>k:K  a hash { v: value, x: expiry ms }           — get/set/increment/CAS
 *             or a sorted set  id → time it was added (ms)   — sliding windows
 *             or a hash { x: expiry ms, <sub-bucket start ms>: count, … } — rate counters
 *             or a hash { h: 1, n:<holder>: share, x:<holder>: expiry ms, … } — held shares
 *   <prefix>e:K  a sorted set  id → expiry ms of that event  (windows only)
 * Every stored thing carries its own expiry, checked by each script against the store's clock
 * (Redis's `TIME`); Redis's own key expiry (PEXPIREAT, same instant) reclaims the storage, and
 * each window drops its expired events whenever it is written or counted, each rate counter its
 * sub-buckets that left the window (so it holds at most RATE_BUCKETS + 1 of them), each key of
 * held shares the shares whose lease ended.
 *
 * Unreachable Redis: the client reconnects on its own (backing off up to 2 s). An operation waits
 * for the connection and the answer together at most `timeoutMs`, then rejects with a StateError
 * ("the Redis server is unreachable", or "did not answer within … ms" when connected but silent).
 * The server starts and keeps running meanwhile: callers fail closed per operation (state.ts).
 */

/** The store's clock from the script's first argument when a test gives one, else Redis's. */
const PRELUDE = `
local function now()
  local n = tonumber(ARGV[1])
  if n then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ms(n) return string.format('%.0f', n) end
local function live_value(k, t)
  if redis.call('TYPE', k).ok ~= 'hash' then return nil end
  local r = redis.call('HMGET', k, 'v', 'x')
  if not r[1] or not r[2] or tonumber(r[2]) <= t then return nil end
  return r[1]
end
local function put_value(k, e, value, ttl, t)
  local x = t + ttl
  redis.call('DEL', k, e)
  redis.call('HSET', k, 'v', value, 'x', ms(x))
  redis.call('PEXPIREAT', k, ms(x))
end
local function prune(k, e, t)
  while true do
    local gone = redis.call('ZRANGEBYSCORE', e, '-inf', ms(t), 'LIMIT', 0, 500)
    if #gone == 0 then return end
    redis.call('ZREM', e, unpack(gone))
    if redis.call('TYPE', k).ok == 'zset' then redis.call('ZREM', k, unpack(gone)) end
  end
end
local function is_window(k) return redis.call('TYPE', k).ok == 'zset' end
local function is_hold(k)
  return redis.call('TYPE', k).ok == 'hash' and redis.call('HEXISTS', k, 'h') == 1
end
local function is_rate(k)
  return redis.call('TYPE', k).ok == 'hash' and redis.call('HEXISTS', k, 'v') == 0 and not is_hold(k)
end
`;

/** Each script: KEYS = [<prefix>k:K, <prefix>e:K]; ARGV[1] = the test clock or ''. */
const SCRIPTS = {
  get: `return live_value(KEYS[1], now())`,
  // ARGV: now, value, ttl
  set: `put_value(KEYS[1], KEYS[2], ARGV[2], tonumber(ARGV[3]), now()) return 1`,
  delete: `
    local t = now()
    local live = live_value(KEYS[1], t) ~= nil
    if not live and is_window(KEYS[1]) then
      live = redis.call('ZCOUNT', KEYS[2], '(' .. ms(t), '+inf') > 0
    elseif not live and is_rate(KEYS[1]) then
      live = tonumber(redis.call('HGET', KEYS[1], 'x') or '0') > t
    elseif not live and is_hold(KEYS[1]) then
      local flat = redis.call('HGETALL', KEYS[1])
      for i = 1, #flat, 2 do
        if string.sub(flat[i], 1, 2) == 'x:' and tonumber(flat[i + 1]) > t then live = true end
      end
    end
    redis.call('DEL', KEYS[1], KEYS[2])
    if live then return 1 else return 0 end`,
  // ARGV: now, by, ttl. Returns {1, result}, or {0} when the value is not an integer.
  increment: `
    local t = now()
    local by = tonumber(ARGV[2])
    local v = live_value(KEYS[1], t)
    if v == nil then
      put_value(KEYS[1], KEYS[2], ARGV[2], tonumber(ARGV[3]), t)
      return {1, ARGV[2]}
    end
    if not string.match(v, '^%-?%d+$') then return {0} end
    local n = tonumber(v) + by
    if math.abs(n) > 9007199254740991 then return {0} end
    redis.call('HSET', KEYS[1], 'v', ms(n))
    return {1, ms(n)}`,
  // ARGV: now, has expected ('1'/'0'), expected, has next, next, ttl
  compareAndSet: `
    local t = now()
    local cur = live_value(KEYS[1], t)
    if ARGV[2] == '1' then
      if cur ~= ARGV[3] then return 0 end
    elseif cur ~= nil then return 0 end
    if ARGV[4] == '1' then put_value(KEYS[1], KEYS[2], ARGV[5], tonumber(ARGV[6]), t)
    elseif not is_window(KEYS[1]) then redis.call('DEL', KEYS[1]) end
    return 1`,
  // ARGV: now, id, windowMs. A value under the key is replaced by the window.
  addEvent: `
    local t = now()
    local w = tonumber(ARGV[3])
    if not is_window(KEYS[1]) then redis.call('DEL', KEYS[1], KEYS[2]) end
    prune(KEYS[1], KEYS[2], t)
    redis.call('ZADD', KEYS[1], ms(t), ARGV[2])
    redis.call('ZADD', KEYS[2], ms(t + w), ARGV[2])
    local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2]
    redis.call('PEXPIREAT', KEYS[1], last)
    redis.call('PEXPIREAT', KEYS[2], last)
    return redis.call('ZCOUNT', KEYS[1], '(' .. ms(t - w), '+inf')`,
  // ARGV: now, id
  removeEvent: `
    local t = now()
    if not is_window(KEYS[1]) then return 0 end
    local x = redis.call('ZSCORE', KEYS[2], ARGV[2])
    redis.call('ZREM', KEYS[1], ARGV[2])
    redis.call('ZREM', KEYS[2], ARGV[2])
    if x and tonumber(x) > t then return 1 else return 0 end`,
  // ARGV: now, windowMs
  countEvents: `
    local t = now()
    if not is_window(KEYS[1]) then return 0 end
    prune(KEYS[1], KEYS[2], t)
    return redis.call('ZCOUNT', KEYS[1], '(' .. ms(t - tonumber(ARGV[2])), '+inf')`,
  // ARGV: now, by, windowMs, sub-bucket width. Adding replaces a value or window under the key.
  // Sums the sub-buckets that still overlap the window, dropping the others (see state-sqlite's
  // rateBuckets for the same arithmetic).
  addToRate: `
    local t = now()
    local by = tonumber(ARGV[2])
    local w = tonumber(ARGV[3])
    local width = tonumber(ARGV[4])
    local k = KEYS[1]
    if not is_rate(k) then
      if by == 0 then return 0 end
      redis.call('DEL', k, KEYS[2])
    end
    local bucket = t - (t % width)
    local oldest = t - w - width
    local total = 0
    local flat = redis.call('HGETALL', k)
    local gone = {}
    for i = 1, #flat, 2 do
      local b = tonumber(flat[i])
      if flat[i] ~= 'x' and b then
        if b <= oldest then gone[#gone + 1] = flat[i]
        elseif b ~= bucket then total = total + tonumber(flat[i + 1]) end
      end
    end
    if #gone > 0 then redis.call('HDEL', k, unpack(gone)) end
    if by ~= 0 then
      total = total + redis.call('HINCRBY', k, ms(bucket), by)
      local x = math.max(bucket + width + w, tonumber(redis.call('HGET', k, 'x') or '0'))
      redis.call('HSET', k, 'x', ms(x))
      redis.call('PEXPIREAT', k, ms(x))
    else
      total = total + tonumber(redis.call('HGET', k, ms(bucket)) or '0')
    end
    if total < 0 then total = 0 end
    return total`,
  // ARGV: now, holder, by, leaseMs. Sums the live shares, dropping the others; a share of 0 is
  // no field at all. Adding replaces a value, window or rate under the key.
  hold: `
    local t = now()
    local k = KEYS[1]
    local by = tonumber(ARGV[3])
    if not is_hold(k) then
      if by == 0 then return 0 end
      redis.call('DEL', k, KEYS[2])
    end
    local own = 'n:' .. ARGV[2]
    local flat = redis.call('HGETALL', k)
    local shares, expiry, gone = {}, {}, {}
    for i = 1, #flat, 2 do
      local f = flat[i]
      if string.sub(f, 1, 2) == 'x:' then expiry[string.sub(f, 3)] = tonumber(flat[i + 1])
      elseif string.sub(f, 1, 2) == 'n:' then shares[string.sub(f, 3)] = tonumber(flat[i + 1]) end
    end
    local total, last = 0, 0
    local mine = 0
    for holder, n in pairs(shares) do
      local x = expiry[holder] or 0
      if x <= t then
        gone[#gone + 1] = 'n:' .. holder
        gone[#gone + 1] = 'x:' .. holder
      elseif 'n:' .. holder == own then mine = n
      else
        total = total + n
        if x > last then last = x end
      end
    end
    if #gone > 0 then redis.call('HDEL', k, unpack(gone)) end
    mine = math.max(0, mine + by)
    if mine > 0 then
      local x = t + tonumber(ARGV[4])
      redis.call('HSET', k, 'h', '1', own, ms(mine), 'x:' .. ARGV[2], ms(x))
      if x > last then last = x end
    else
      redis.call('HDEL', k, own, 'x:' .. ARGV[2])
    end
    if last > 0 then redis.call('PEXPIREAT', k, ms(last)) else redis.call('DEL', k) end
    return total + mine`,
} as const;

type ScriptName = keyof typeof SCRIPTS;

const SOURCES = Object.fromEntries(
  Object.entries(SCRIPTS).map(([name, body]) => {
    const source = `${PRELUDE}\n${body}`;
    return [name, { source, sha: createHash('sha1').update(source).digest('hex') }];
  }),
) as Record<ScriptName, { source: string; sha: string }>;

export interface RedisStateOptions {
  /** `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS. */
  readonly url: string;
  /** Put before every key, so several servers (or other programs) can share one Redis. */
  readonly prefix?: string;
  /** How long an operation may wait for Redis's answer before it rejects (default 2 s). */
  readonly timeoutMs?: number;
  /** Where losing and regaining the connection is reported. */
  readonly log?: Logger;
  /** The store's clock, in ms since the epoch (tests move it); Redis's clock by default. */
  readonly now?: () => number;
}

export class RedisState implements StateStore {
  private readonly client: RedisClientType;
  private readonly prefix: string;
  private readonly timeoutMs: number;
  private readonly log: Logger | undefined;
  private readonly now: (() => number) | undefined;
  private closed = false;
  /** Resolves when the connection is (back) up; shared by every operation waiting for it. */
  private ready: { promise: Promise<void>; resolve: () => void } | undefined;
  /** Reported once per outage, not once per reconnection attempt. */
  private down = false;
  private readonly holdings: Holdings;

  constructor(opts: RedisStateOptions) {
    this.prefix = opts.prefix ?? 'petrel:';
    this.timeoutMs = opts.timeoutMs ?? 2000;
    this.log = opts.log;
    this.now = opts.now;
    this.holdings = new Holdings((key, o) => this.hold(key, o), opts.now ?? Date.now, opts.log);
    // Loaded only with `state: redis`: the client is large, and most servers use SQLite.
    const { createClient } = createRequire(import.meta.url)('redis') as typeof import('redis');
    this.client = createClient({
      url: opts.url,
      // No queue while the connection is down: an operation waits for the connection itself,
      // within its deadline (see run), and is not sent at all once that has passed.
      disableOfflineQueue: true,
      socket: {
        connectTimeout: this.timeoutMs,
        reconnectStrategy: (retries: number) => Math.min(100 * 2 ** retries, 2000),
      },
    }) as RedisClientType;
    this.client.on('error', (err: Error) => {
      if (this.down || this.closed) return;
      this.down = true;
      this.log?.error({ err }, 'state: the Redis server is unreachable; operations fail until it is back');
    });
    this.client.on('ready', () => {
      if (this.down) this.log?.info('state: the Redis server is reachable again');
      this.down = false;
      this.ready?.resolve();
      this.ready = undefined;
    });
    // Not awaited: the server starts without Redis and the client keeps trying (see above).
    this.client.connect().catch(() => undefined);
  }

  get(key: string): Promise<string | null> {
    return this.run('get', key, []).then((r) => (r === null ? null : String(r)));
  }

  async set(key: string, value: string, opts: { ttlMs: number }): Promise<void> {
    await this.run('set', key, [value, ttl(opts.ttlMs)]);
  }

  delete(key: string): Promise<boolean> {
    return this.run('delete', key, []).then((r) => r === 1);
  }

  async increment(key: string, opts: { ttlMs: number; by?: number }): Promise<number> {
    const by = opts.by ?? 1;
    const reply = (await this.run('increment', key, () => {
      if (!Number.isSafeInteger(by)) throw new TypeError(`expected an integer to add, got ${by}`);
      return [String(by), ttl(opts.ttlMs)];
    })) as [number, string?];
    if (reply[0] !== 1)
      throw new StateError(`state increment "${key}": the value is not an integer`, {
        cause: new TypeError('the value is not an integer'),
      });
    return Number(reply[1]);
  }

  compareAndSet(
    key: string,
    expected: string | null,
    next: string,
    opts: { ttlMs: number },
  ): Promise<boolean>;
  compareAndSet(key: string, expected: string | null, next: null): Promise<boolean>;
  compareAndSet(
    key: string,
    expected: string | null,
    next: string | null,
    opts?: { ttlMs: number },
  ): Promise<boolean> {
    return this.run('compareAndSet', key, () => [
      expected === null ? '0' : '1',
      expected ?? '',
      next === null ? '0' : '1',
      next ?? '',
      next === null ? '0' : ttl(opts?.ttlMs),
    ]).then((r) => r === 1);
  }

  addEvent(key: string, id: string, opts: { windowMs: number }): Promise<number> {
    return this.run('addEvent', key, () => [id, ttl(opts.windowMs)]).then(Number);
  }

  removeEvent(key: string, id: string): Promise<boolean> {
    return this.run('removeEvent', key, [id]).then((r) => r === 1);
  }

  countEvents(key: string, opts: { windowMs: number }): Promise<number> {
    return this.run('countEvents', key, () => [ttl(opts.windowMs)]).then(Number);
  }

  addToRate(key: string, opts: { windowMs: number; by?: number }): Promise<number> {
    const by = opts.by ?? 1;
    return this.run('addToRate', key, () => {
      if (!Number.isSafeInteger(by)) throw new TypeError(`expected an integer to add, got ${by}`);
      const windowMs = ttl(opts.windowMs);
      return [String(by), windowMs, String(Math.max(1, Math.ceil(Number(windowMs) / RATE_BUCKETS)))];
    }).then(Number);
  }

  hold(key: string, opts: { leaseMs: number; by?: number }): Promise<number> {
    const by = opts.by ?? 1;
    return this.run('hold', key, () => {
      if (!Number.isSafeInteger(by)) throw new TypeError(`expected an integer to add, got ${by}`);
      const lease = ttl(opts.leaseMs);
      this.holdings.asked(key, by, opts.leaseMs);
      return [this.holdings.holder, String(by), lease];
    }).then(Number);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    // Its shares end with it, if Redis answers in time; otherwise they end with their lease.
    if (this.client.isReady) await this.holdings.giveUp();
    else this.holdings.stop();
    this.closed = true;
    // Nothing is waiting to be written that must survive: drop the connection (and any retries).
    this.client.destroy();
  }

  /** Resolves once the client is connected (at once when it is). */
  private connected(): Promise<void> {
    if (this.client.isReady) return Promise.resolve();
    if (!this.ready) {
      let resolve!: () => void;
      const promise = new Promise<void>((r) => (resolve = r));
      this.ready = { promise, resolve };
    }
    return this.ready.promise;
  }

  /**
   * Runs one script with its arguments (or a function that builds them, so that a bad argument
   * rejects like any other failure). Any failure, including no answer within `timeoutMs`, is a
   * StateError.
   */
  private async run(name: ScriptName, key: string, args: string[] | (() => string[])): Promise<unknown> {
    const fail = (why: string, cause?: unknown): StateError =>
      new StateError(`state ${name} "${key}": ${why}`, cause === undefined ? undefined : { cause });
    if (this.closed) throw fail('the store is closed');
    let argv: string[];
    try {
      argv = typeof args === 'function' ? args() : args;
    } catch (err) {
      throw fail((err as Error).message, err);
    }
    const script = SOURCES[name];
    const options = {
      keys: [`${this.prefix}k:${key}`, `${this.prefix}e:${key}`],
      arguments: [this.now ? String(this.now()) : '', ...argv],
    };
    let timer: NodeJS.Timeout | undefined;
    let expired = false;
    // One deadline for the whole operation: waiting for the connection, then for the answer.
    // (Once sent, an operation whose answer comes too late may still have been applied.)
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        expired = true;
        const why = this.client.isReady
          ? `the Redis server did not answer within ${this.timeoutMs} ms`
          : 'the Redis server is unreachable';
        reject(fail(why));
      }, this.timeoutMs);
    });
    const call = async (): Promise<unknown> => {
      await this.connected();
      // The caller was already told it failed: do not apply it behind its back.
      if (expired) return undefined;
      try {
        return await this.client.evalSha(script.sha, options);
      } catch (err) {
        // First use of a script on this Redis (or after it restarted): send the source once.
        if (!/NOSCRIPT/.test((err as Error).message)) throw err;
        return await this.client.eval(script.source, options);
      }
    };
    try {
      return await Promise.race([call(), deadline]);
    } catch (err) {
      if (err instanceof StateError) throw err;
      throw fail((err as Error).message, err);
    } finally {
      clearTimeout(timer);
    }
  }
}

function ttl(ms: number | undefined): string {
  if (typeof ms !== 'number' || !Number.isFinite(ms) || ms <= 0)
    throw new TypeError(`expected a lifetime in ms greater than 0, got ${ms}`);
  return String(Math.ceil(ms));
}
