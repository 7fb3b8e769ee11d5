/**
 * The engine benchmark (`npm run bench`): how fast Petrel takes mail compared with Postfix's
 * smtp-sink on the same machine in the same run, with one worker process and with two, and what
 * an idle connection costs.
 *
 * Petrel runs as a child process (the real CLI: a primary and its workers) with one plugin that
 * accepts and discards every message (bench/discard-plugin.ts). Postfix's smtp-source is the
 * client for every server, with a new connection per message. smtp-sink, a minimal C server that
 * throws mail away, is the upper bound. Figures are printed and written to var/bench-results.json.
 *
 * With defences (`petrel+defence`): one worker with the `dnsbl`, `limit` and `greylist` plugins
 * in front of the discard plugin, judging every client (no trusted networks): dnsbl asks a local
 * dnsmasq about a list the client is not on, limit counts connections and messages in the State
 * service, and greylist knows the client's triplet already (it passed before the runs). Its rate
 * is compared with the plain one-worker Petrel's at 50 sessions and 1 KB.
 *
 * With metrics (`petrel+metrics`): one worker with the `http` listener on, its `/metrics` scraped
 * once a second for as long as the bench runs (as Prometheus would); its rate is compared with
 * the plain one-worker Petrel's at 50 sessions and 1 KB, in the same run.
 *
 * Environment: BENCH_SCALE multiplies the message counts (default 1; e.g. 0.1 for a quick look).
 * BENCH_ONLY=defence runs only the two rows the defence ratio compares (`petrel` and
 * `petrel+defence`, 1 KB at 50 sessions; no idle-memory test, no smtp-sink, no two-worker Petrel):
 * a short run to repeat while working on the defence plugins; BENCH_ONLY=metrics likewise for
 * `petrel` and `petrel+metrics`. BENCH_PROFILE=1 has each of
 * Petrel's processes write a V8 CPU profile into var/profiles/ when it stops (open it in Chrome
 * DevTools); the file names carry the process ids logged at start.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { startDnsmasq, type Dnsmasq } from '../test/harness/dnsmasq.js';
import { SmtpClient } from '../test/harness/smtp-client.js';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  backgroundLoad,
  BenchError,
  CLI,
  busiestShare,
  countEveryWorker,
  describeMachine,
  HOST,
  KB,
  log,
  machineLine,
  openGreeted,
  peerPrograms,
  processColumns,
  ratioLine,
  ratiosOf,
  requireBuilt,
  ROOT,
  runMain,
  sample,
  scale,
  serverRssKiB,
  sleep,
  startPetrel,
  startSink,
  stop,
  sumOf,
  table,
  WORKER_COUNTS,
  workerPids,
  type Probe,
  type Run,
  type Server,
  type WorkerCounts,
  runMatrix,
  finishRuns,
  freePort,
} from './harness.js';

const PLUGIN = join(ROOT, 'dist', 'bench', 'discard-plugin.js');
const RESULTS = join(ROOT, 'var', 'bench-results.json');
const PROFILES = join(ROOT, 'var', 'profiles');

const SIZES = [1 * KB, 100 * KB] as const;
const SESSIONS = [1, 10, 50] as const;
/** Messages per run at BENCH_SCALE=1, by payload size. */
const BASE_COUNT: Record<number, number> = { [1 * KB]: 5000, [100 * KB]: 1000 };
/** Each cell is measured this many times, the two servers taking turns; the median counts. */
const ROUNDS = 5;
const IDLE_CONNECTIONS = 1000;
/** The goal: at 50 sessions and 1 KB, at least half of smtp-sink's rate. */
const TARGET_RATIO = 0.5;
/** With dnsbl, limit and greylist on: at least this share of the plain rate (50 sessions, 1 KB). */
const DEFENCE_TARGET = 0.8;
/** The greylist delay in the bench: the client waits it out once, before the runs. */
const GREYLIST_DELAY_MS = 1000;
/** With the metrics listener on and scraped once a second: at least this share of the plain rate. */
const METRICS_TARGET = 0.95;
const SCRAPE_EVERY_MS = 1000;

interface MemoryResult {
  readonly workers: number;
  readonly connections: number;
  readonly rssBeforeKiB: number;
  readonly rssAfterKiB: number;
  readonly totalKiB: number;
  readonly perConnectionKiB: number;
}

/** BENCH_ONLY: `defence` or `metrics` for the two rows of that ratio only (see the header). */
function only(): 'all' | 'defence' | 'metrics' {
  const raw = process.env.BENCH_ONLY;
  if (raw === undefined || raw === '') return 'all';
  if (raw === 'defence' || raw === 'metrics') return raw;
  throw new BenchError(`BENCH_ONLY must be "defence", "metrics" or unset, got "${raw}"`);
}

/** BENCH_PROFILE=1: Node's arguments that make each Petrel process write a CPU profile. */
function profileArgs(): string[] {
  return process.env.BENCH_PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${PROFILES}`] : [];
}

/** Starts Petrel with the discard plugin; its config and spool go in `dir` (created). */
function startDiscardPetrel(dir: string, workers: number, nodeArgs: readonly string[] = []): Promise<Server> {
  return startPetrel(dir, [PLUGIN], workers, nodeArgs);
}

/**
 * Checks that the discard plugins of all workers together accepted exactly the messages of the
 * run, and keeps the share the busiest worker took.
 */
function countProbe(server: Server): Probe {
  let before: WorkerCounts = new Map();
  return {
    async start() {
      before = await countEveryWorker(server, 1);
    },
    async finish(messages) {
      const after = await countEveryWorker(server, 1);
      const accepted = sumOf(after, 0) - sumOf(before, 0);
      const busiestWorker = busiestShare(before, after, 0);
      const figures: Record<string, number> = busiestWorker === undefined ? {} : { busiestWorker };
      return {
        problems:
          accepted === messages ? [] : [`${server.target} accepted ${accepted} of ${messages} messages`],
        figures,
      };
    },
  };
}

/**
 * Opens `connections` connections to a Petrel of its own (so that garbage left by other traffic
 * cannot hide the growth), waits for every greeting, and compares the RSS of the whole server
 * (primary and workers) before and after.
 */
async function idleMemory(dir: string, workers: number, connections: number): Promise<MemoryResult> {
  const server = await startDiscardPetrel(dir, workers);
  const sockets: Socket[] = [];
  try {
    // Let the first sessions load and compile their code paths, so the baseline includes that.
    const warm = await Promise.all(Array.from({ length: 20 * workers }, () => openGreeted(server.port)));
    for (const s of warm) s.destroy();
    await sleep(1000);
    const rssBeforeKiB = serverRssKiB(server);
    const batch = 100;
    for (let i = 0; i < connections; i += batch) {
      const n = Math.min(batch, connections - i);
      sockets.push(...(await Promise.all(Array.from({ length: n }, () => openGreeted(server.port)))));
    }
    await sleep(1000);
    const rssAfterKiB = serverRssKiB(server);
    const totalKiB = rssAfterKiB - rssBeforeKiB;
    if (server.complaints.length) throw new BenchError(`Petrel said:\n${server.complaints.join('\n')}`);
    return {
      workers,
      connections,
      rssBeforeKiB,
      rssAfterKiB,
      totalKiB,
      perConnectionKiB: totalKiB / connections,
    };
  } finally {
    for (const s of sockets) s.destroy();
    await stop(server.child);
  }
}

/**
 * One worker with the defence plugins in front of the discard plugin; the client has passed
 * greylisting before it returns (a first attempt, the delay, a second attempt).
 */
async function startDefendedPetrel(dir: string, dns: Dnsmasq): Promise<Server> {
  const judgeEveryone = { trustedNetworks: [] };
  const lots = { max: 1_000_000_000, per: '1m' };
  const plugins = [
    { name: 'dnsbl', config: { ...judgeEveryone, block: [{ zone: 'bl.bench.test', name: 'Bench BL' }] } },
    {
      name: 'limit',
      config: {
        ...judgeEveryone,
        connections: lots,
        concurrency: { max: 1_000_000 },
        messages: { perClient: lots },
        recipients: { perMessage: 100, perClient: lots },
      },
    },
    { name: 'greylist', config: { ...judgeEveryone, delay: `${GREYLIST_DELAY_MS}ms`, retryWindow: '1h' } },
    PLUGIN,
  ];
  const started = await startPetrel(dir, plugins, 1, profileArgs(), { dns: { servers: [dns.server] } });
  const server: Server = { ...started, target: 'petrel+defence' };
  const attempt = async (): Promise<number> => {
    const c = await SmtpClient.connect(server.port, HOST);
    try {
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('MAIL FROM:<from@bench.test>', /^250 /);
      c.send('RCPT TO:<to@bench.test>');
      const { code } = await c.reply();
      await c.cmd('QUIT', /^221 /);
      return code;
    } finally {
      c.close();
    }
  };
  const first = await attempt();
  await sleep(GREYLIST_DELAY_MS * 1.5);
  const second = await attempt();
  if (first !== 451 || second !== 250)
    throw new BenchError(`greylisting did not behave: first attempt ${first}, second ${second}`);
  return server;
}

/** A target's rate over the plain one-worker rate, at 50 sessions and 1 KB. */
function ratioToPlain(runs: readonly Run[], target: string): number | null {
  const find = (t: string): Run | undefined =>
    runs.find((r) => r.target === t && r.size === 1 * KB && r.sessions === 50 && !r.failure);
  const other = find(target);
  const plain = find('petrel');
  return other && plain ? other.perSecond / plain.perSecond : null;
}

/**
 * One worker with the `http` listener, and a scraper that fetches `/metrics` once a second
 * until `stop()`; a scrape that fails is counted and reported.
 */
async function startScrapedPetrel(
  dir: string,
): Promise<{ server: Server; scrapes: () => { ok: number; failed: number }; stop: () => void }> {
  const httpPort = await freePort();
  const started = await startPetrel(dir, [PLUGIN], 1, [], {
    listeners: [{ kind: 'http', address: HOST, port: httpPort }],
  });
  const server: Server = { ...started, target: 'petrel+metrics' };
  let ok = 0;
  let failed = 0;
  const timer = setInterval(() => {
    fetch(`http://${HOST}:${httpPort}/metrics`)
      .then(async (r) => {
        await r.text();
        if (r.status === 200) ok++;
        else failed++;
      })
      .catch(() => failed++);
  }, SCRAPE_EVERY_MS);
  return { server, scrapes: () => ({ ok, failed }), stop: () => clearInterval(timer) };
}

// ---------------------------------------------------------------- main

async function main(): Promise<number> {
  const factor = scale();
  const { source, sink } = peerPrograms();
  requireBuilt([CLI, PLUGIN], 'npm run bench');

  const machine = describeMachine();
  const out = process.stdout;
  const dir = mkdtempSync(join(tmpdir(), 'petrel-bench-'));
  const servers: Server[] = [];
  let dns: Dnsmasq | null = null;
  let scraped: Awaited<ReturnType<typeof startScrapedPetrel>> | null = null;
  try {
    const idle = await backgroundLoad();
    out.write(machineLine(machine, idle));
    if (idle > 0.15) log('warning: the machine is already busy; expect noisy figures');

    const subset = only();
    const memory: MemoryResult[] = [];
    for (const workers of subset === 'all' ? WORKER_COUNTS : []) {
      log(`idle connections: opening ${IDLE_CONNECTIONS} to a fresh Petrel with ${workers} worker(s)…`);
      memory.push(await idleMemory(join(dir, `idle-${workers}`), workers, IDLE_CONNECTIONS));
    }

    for (const workers of subset === 'all' ? WORKER_COUNTS : [1]) {
      const petrel = await startDiscardPetrel(join(dir, `throughput-${workers}`), workers, profileArgs());
      servers.push(petrel);
      log(
        `${petrel.target} on ${HOST}:${petrel.port} (primary ${petrel.child.pid}, ` +
          `workers ${workerPids(petrel).join(', ')})`,
      );
    }
    if (subset !== 'metrics') {
      // The DNS list answers from a local server: every lookup is a real query, then the cache.
      // With no test to skip, a missing dnsmasq throws rather than answering null.
      const lists = (await startDnsmasq(null, { local: ['bench.test'] }, { stopWithTest: false }))!;
      dns = lists;
      const defended = await startDefendedPetrel(join(dir, 'defence'), lists);
      servers.push(defended);
      log(
        `${defended.target} on ${HOST}:${defended.port} (primary ${defended.child.pid}): dnsbl, limit, greylist`,
      );
    }
    if (subset !== 'defence') {
      scraped = await startScrapedPetrel(join(dir, 'metrics'));
      servers.push(scraped.server);
      log(
        `${scraped.server.target} on ${HOST}:${scraped.server.port} (primary ${scraped.server.child.pid}): ` +
          `/metrics scraped every ${SCRAPE_EVERY_MS} ms`,
      );
    }
    const smtpSink = subset === 'all' ? await startSink(sink) : null;
    if (smtpSink) {
      servers.push(smtpSink);
      log(`smtp-sink on ${HOST}:${smtpSink.port}`);
    }
    const probeOf = (server: Server): Probe | undefined =>
      server === smtpSink ? undefined : countProbe(server);

    const count = (size: number, sessions: number): number =>
      Math.max(sessions, Math.round((BASE_COUNT[size] ?? 1000) * factor));

    const runs = await runMatrix({
      servers,
      sizes: subset === 'all' ? SIZES : [1 * KB],
      sessions: subset === 'all' ? SESSIONS : [50],
      rounds: ROUNDS,
      warmupMessages: Math.max(10, Math.round(count(1 * KB, 10) / 5)),
      count,
      measure: (server, size, sessions, messages) =>
        sample(source, server, size, sessions, messages, probeOf(server)),
    });

    const ratios = ratiosOf(runs, 1 * KB, 50);
    out.write(
      `\nThroughput (smtp-source, one connection per message, scale ${factor}, median of ${ROUNDS} rounds; ` +
        `petrel×n: n worker processes):\n\n${table(runs, processColumns())}\n\n`,
    );
    if (smtpSink) out.write(`${ratioLine('Petrel/smtp-sink at 50 sessions, 1 KB', ratios, TARGET_RATIO)}\n`);
    const defence = ratioToPlain(runs, 'petrel+defence');
    const withMetrics = ratioToPlain(runs, 'petrel+metrics');
    const scrapes = scraped?.scrapes() ?? { ok: 0, failed: 0 };
    if (subset !== 'metrics')
      out.write(
        `Petrel with dnsbl, limit and greylist/without at 50 sessions, 1 KB: ${defence === null ? 'n/a' : defence.toFixed(2)} ` +
          `(target ≥ ${DEFENCE_TARGET}: ${defence !== null && defence >= DEFENCE_TARGET ? 'met' : 'NOT met'})\n`,
      );
    if (subset !== 'defence')
      out.write(
        `Petrel with /metrics scraped every ${SCRAPE_EVERY_MS / 1000} s/without at 50 sessions, 1 KB: ` +
          `${withMetrics === null ? 'n/a' : withMetrics.toFixed(2)} ` +
          `(target ≥ ${METRICS_TARGET}: ${withMetrics !== null && withMetrics >= METRICS_TARGET ? 'met' : 'NOT met'}; ` +
          `${scrapes.ok} scrapes, ${scrapes.failed} failed)\n`,
      );
    for (const m of memory) {
      out.write(
        `Idle connections, ${m.workers} worker${m.workers === 1 ? '' : 's'}: ${m.connections} greeted ` +
          `connections added ${m.totalKiB} KiB to the RSS of Petrel's processes (${m.rssBeforeKiB} → ${m.rssAfterKiB} KiB), ` +
          `${m.perConnectionKiB.toFixed(1)} KiB per connection\n`,
      );
    }

    return finishRuns(out, RESULTS, {
      date: new Date().toISOString(),
      machine,
      scale: factor,
      rounds: ROUNDS,
      backgroundLoad: idle,
      runs,
      ratio50x1KB: ratios,
      targetRatio: TARGET_RATIO,
      defenceRatio50x1KB: defence,
      defenceTarget: DEFENCE_TARGET,
      metricsRatio50x1KB: withMetrics,
      metricsTarget: METRICS_TARGET,
      scrapes,
      idleConnections: memory,
    });
  } finally {
    scraped?.stop();
    await Promise.all(servers.map((s) => stop(s.child)));
    await dns?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

runMain(main, 'bench');
