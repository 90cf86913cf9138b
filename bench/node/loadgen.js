'use strict';
/*
 * The benchmark's load generator: WebSocket clients (the `ws` library) and
 * the HTTP publisher, in one Node process that the Python runner pins to its
 * own core.
 *
 * It is driven by JSON commands on stdin, one per line, and answers each with
 * one JSON line on stdout ({"ok": true, ...} or {"ok": false, "error": ...}),
 * so the runner can sample the server's memory and CPU between steps while the
 * connections stay open.  Commands run one at a time, in order.
 *
 * Knowledge of the servers stays in the runner: it passes URL templates and
 * publish body templates; this file only opens, sends, receives, times and
 * checks.  Every wait here is bounded by a deadline given in the command.
 */

const http = require('http');
const readline = require('readline');
const { performance } = require('perf_hooks');
const WebSocket = require('ws');

/** Milliseconds on the wall clock, sub-millisecond resolution: comparable with the app process. */
const now = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** name -> array of Client */
const groups = new Map();

/**
 * One WebSocket client.  `onData` is set by the workload running now; pongs
 * to our heartbeat are counted apart so they never disturb a workload's checks.
 */
class Client {
  constructor(index, ws) {
    this.index = index;
    this.ws = ws;
    this.onData = null;
    this.pings = 0;
    this.pongs = 0;
    this.timers = [];
    this.closed = false;
  }
}

/** Node's clearTimeout clears intervals too. */
function stopTimers(client) {
  for (const t of client.timers) clearTimeout(t);
  client.timers = [];
}

/** Replace {i} in a template with the client's index. */
const fill = (template, i) => template.split('{i}').join(String(i));

function openOne(index, cmd) {
  return new Promise((resolve) => {
    const headers = {};
    for (const [k, v] of Object.entries(cmd.headers || {})) headers[k] = fill(v, index);
    const ws = new WebSocket(fill(cmd.url, index), {
      headers,
      perMessageDeflate: false, // none of the servers is asked to compress; keep it level
      handshakeTimeout: cmd.handshakeTimeoutMs || 20000,
    });
    const client = new Client(index, ws);
    let settled = false;
    const done = (error) => {
      if (settled) return;
      settled = true;
      resolve({ client, error });
    };
    ws.on('open', () => done(null));
    ws.on('unexpected-response', (req, res) => done(`HTTP ${res.statusCode}`));
    ws.on('error', (err) => done(err.message || String(err)));
    ws.on('close', (code, reason) => {
      client.closed = true;
      client.closeCode = `${code}${reason && reason.length ? ' ' + reason.toString() : ''}`;
      stopTimers(client);
      done('closed before open');
    });
    ws.on('message', (data, isBinary) => {
      const text = isBinary ? data : data.toString();
      if (cmd.ping && text === cmd.ping.pong) {
        client.pongs++;
        return;
      }
      if (client.onData) client.onData(text);
    });
  });
}

/**
 * Heartbeat as real front ends do it: every `interval` ms, starting at a
 * random phase so that N clients do not ping in one burst.
 */
function startHeartbeat(client, ping) {
  const beat = () => {
    if (client.ws.readyState === WebSocket.OPEN) {
      client.ws.send(ping.text);
      client.pings++;
    }
  };
  const first = setTimeout(() => {
    beat();
    client.timers.push(setInterval(beat, ping.interval));
  }, Math.random() * ping.interval);
  client.timers.push(first);
}

/** open: add `count` clients to a group, at most `concurrency` handshakes at once. */
async function open(cmd) {
  const group = groups.get(cmd.group) || [];
  groups.set(cmd.group, group);
  const base = group.length;
  const errors = {};
  let failed = 0;
  let next = 0;
  const started = now();
  const deadline = started + (cmd.timeoutMs || 120000);
  let retried = 0;
  const worker = async () => {
    while (next < cmd.count && now() < deadline) {
      const i = base + next++;
      // A refused handshake is tried again (up to `retries` times) and
      // counted, so a server that sheds load shows it without losing the run.
      for (let attempt = 0; attempt <= (cmd.retries || 0) && now() < deadline; attempt++) {
        const { client, error } = await openOne(i, cmd);
        if (!error) {
          group.push(client);
          if (cmd.ping) startHeartbeat(client, cmd.ping);
          break;
        }
        errors[error] = (errors[error] || 0) + 1;
        client.ws.terminate();
        if (attempt === (cmd.retries || 0)) failed++;
        else retried++;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(cmd.concurrency || 100, cmd.count) }, worker));
  const seconds = (now() - started) / 1000;
  const opened = group.length - base;
  return { opened, failed, retried, errors, seconds, rate: opened / seconds, total: group.length };
}

/** close: close every client of a group and wait (bounded) for the closes to finish. */
async function close(cmd) {
  const group = groups.get(cmd.group) || [];
  groups.delete(cmd.group);
  const deadline = now() + (cmd.timeoutMs || 30000);
  for (const c of group) {
    stopTimers(c);
    if (!c.closed) c.ws.close(1000);
  }
  while (group.some((c) => !c.closed) && now() < deadline) await sleep(50);
  let terminated = 0;
  for (const c of group) {
    if (!c.closed) {
      c.ws.terminate();
      terminated++;
    }
  }
  return { closed: group.length - terminated, terminated };
}

/** How many clients of a group have been closed, by close code and reason (the server's word on why). */
function closes(group) {
  const found = {};
  for (const c of group) if (c.closed) found[c.closeCode] = (found[c.closeCode] || 0) + 1;
  return found;
}

/** pongs: how many heartbeats a group has sent and had answered. */
function pongs(cmd) {
  const group = groups.get(cmd.group) || [];
  return { closes: closes(group), pings: group.reduce((n, c) => n + c.pings, 0), pongs: group.reduce((n, c) => n + c.pongs, 0), open: group.filter((c) => !c.closed).length };
}

/**
 * Per-client order check over messages numbered 0..n-1: counts unique,
 * duplicated and out-of-order arrivals; what is missing at the end is lost.
 */
class Sequence {
  constructor(n) {
    this.seen = new Uint8Array(n);
    this.unique = 0;
    this.dup = 0;
    this.reordered = 0;
    this.max = -1;
  }

  add(i) {
    if (!(i >= 0 && i < this.seen.length)) {
      this.dup++; // a number we never sent counts against the server too
      return;
    }
    if (this.seen[i]) {
      this.dup++;
      return;
    }
    this.seen[i] = 1;
    this.unique++;
    if (i < this.max) this.reordered++;
    else this.max = i;
  }
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

// Each client's sequence checks summed over a group, which stops listening.
function tally(group) {
  let unique = 0, dup = 0, reordered = 0;
  for (const c of group) {
    unique += c.seq.unique;
    dup += c.seq.dup;
    reordered += c.seq.reordered;
    c.onData = null;
  }
  return { unique, dup, reordered };
}

function summarize(latencies) {
  const sorted = Float64Array.from(latencies).sort();
  return { p50: percentile(sorted, 50), p99: percentile(sorted, 99), max: sorted.length ? sorted[sorted.length - 1] : null };
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

/** One POST over a kept-alive connection; resolves to {status, body}. */
function post(url, body, headers, timeoutMs) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, {
      method: 'POST',
      agent,
      headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body), ...(headers || {}) },
      timeout: timeoutMs || 10000,
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end(body);
  });
}

/**
 * A publish body from a template: @JSON@ is the payload as a JSON value,
 * @STR@ the payload's text as a JSON string, @RAW@ the text itself.
 */
function publishBody(template, payload) {
  const text = JSON.stringify(payload);
  return template.split('@JSON@').join(text).split('@STR@').join(JSON.stringify(text)).split('@RAW@').join(text);
}

/** ~size bytes of JSON text: {"i":..,"t":..,"p":"xxx"} */
function padded(fields, size) {
  const bare = JSON.stringify({ ...fields, p: '' }).length;
  return { ...fields, p: 'x'.repeat(Math.max(0, size - bare)) };
}

/**
 * fanout: publish `messages` payloads one after another (each after the
 * previous publish answered, as an app would), and check that every client of
 * the group got each exactly once, in order.  Latency is publish start to
 * receipt, from the timestamp in the payload.
 */
async function fanout(cmd) {
  const all = groups.get(cmd.group) || [];
  const group = all.filter((c) => !c.closed);
  const expected = group.length * cmd.messages;
  const latencies = [];
  let deliveries = 0;
  let lastReceipt = 0;
  let bad = 0;
  for (const c of group) {
    c.seq = new Sequence(cmd.messages);
    c.onData = (text) => {
      const t = now();
      let m;
      try {
        m = JSON.parse(text);
      } catch (e) {
        bad++;
        return;
      }
      deliveries++;
      lastReceipt = t;
      latencies.push(t - m.t);
      c.seq.add(m.i);
    };
  }
  const publishErrors = {};
  const started = now();
  for (let i = 0; i < cmd.messages; i++) {
    const body = publishBody(cmd.publish.body, padded({ i, t: now() }, cmd.size || 100));
    try {
      const res = await post(cmd.publish.url, body, cmd.publish.headers);
      if (res.status >= 300) publishErrors[`HTTP ${res.status}`] = (publishErrors[`HTTP ${res.status}`] || 0) + 1;
    } catch (e) {
      publishErrors[e.message] = (publishErrors[e.message] || 0) + 1;
    }
  }
  const published = now();
  const deadline = published + (cmd.drainMs || 30000);
  while (deliveries < expected && now() < deadline) await sleep(20);
  await sleep(cmd.settleMs || 200); // late duplicates would show up here
  const { unique, dup, reordered } = tally(group);
  return {
    clients: group.length,
    expected,
    deliveries,
    lost: expected - unique,
    dup,
    reordered,
    bad,
    publishErrors,
    publishSeconds: (published - started) / 1000,
    seconds: ((lastReceipt || now()) - started) / 1000,
    rate: deliveries / (((lastReceipt || now()) - started) / 1000),
    latencyMs: summarize(latencies),
    closes: closes(all),
  };
}

/** GET a JSON document (the app's counters). */
function getJson(url) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { timeout: 5000 }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        try {
          resolve(JSON.parse(Buffer.concat(chunks).toString()));
        } catch (e) {
          reject(e);
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

/**
 * forward: every client sends `messages` numbered messages as fast as the
 * socket takes them; the app counts and checks them.  The rate is end to end:
 * from the first send to the app's last receipt.
 */
async function forward(cmd) {
  const all = groups.get(cmd.group) || [];
  const group = all.filter((c) => !c.closed);
  const expected = group.length * cmd.messages;
  const started = now();
  for (let s = 0; s < cmd.messages; s++) {
    for (const c of group) c.ws.send(JSON.stringify(padded({ c: c.index, s }, cmd.size || 100)));
  }
  const sent = now();
  const deadline = sent + (cmd.drainMs || 30000);
  let stats = await getJson(cmd.appStats);
  while (stats.unique + stats.dup < expected && now() < deadline) {
    await sleep(50);
    stats = await getJson(cmd.appStats);
  }
  await sleep(cmd.settleMs || 200);
  stats = await getJson(cmd.appStats);
  const seconds = ((stats.lastAt || now()) - started) / 1000;
  return {
    clients: group.length,
    expected,
    received: stats.unique + stats.dup,
    lost: expected - stats.unique,
    dup: stats.dup,
    reordered: stats.reordered,
    sendSeconds: (sent - started) / 1000,
    seconds,
    rate: (stats.unique + stats.dup) / seconds,
    closes: closes(all),
  };
}

/**
 * roundtrip: send at `rate` messages/s in total, round-robin over the group,
 * for `seconds`; each client's message comes back to it through the app and
 * the server.  Latency is send to receipt, per message.
 */
async function roundtrip(cmd) {
  const all = groups.get(cmd.group) || [];
  const group = all.filter((c) => !c.closed);
  const perClient = Math.ceil((cmd.rate * cmd.seconds) / group.length) + 1;
  const latencies = [];
  let received = 0;
  let bad = 0;
  for (const c of group) {
    c.seq = new Sequence(perClient);
    c.sent = 0;
    c.onData = (text) => {
      const t = now();
      let m;
      try {
        m = JSON.parse(text);
      } catch (e) {
        bad++;
        return;
      }
      if (m.c !== c.index) {
        bad++; // someone else's message
        return;
      }
      received++;
      latencies.push(t - m.t);
      c.seq.add(m.s);
    };
  }
  const total = Math.round(cmd.rate * cmd.seconds);
  const started = now();
  let sent = 0;
  let next = 0;
  // Catch up to the schedule every tick: a late timer sends a small burst
  // rather than lowering the offered rate.
  while (sent < total && now() < started + cmd.seconds * 1000 + 5000) {
    const due = Math.min(total, Math.floor(((now() - started) / 1000) * cmd.rate));
    while (sent < due) {
      const c = group[next++ % group.length];
      c.ws.send(JSON.stringify(padded({ c: c.index, s: c.sent++, t: now() }, cmd.size || 100)));
      sent++;
    }
    await sleep(2);
  }
  const sendSeconds = (now() - started) / 1000;
  const deadline = now() + (cmd.drainMs || 10000);
  while (received < sent && now() < deadline) await sleep(20);
  const { unique, dup, reordered } = tally(group);
  return {
    clients: group.length,
    sent,
    received,
    lost: sent - unique,
    dup,
    reordered,
    bad,
    offeredRate: sent / sendSeconds,
    latencyMs: summarize(latencies),
    closes: closes(all),
  };
}

/**
 * apicalls: `count` POSTs of one body, one after another over one kept-alive
 * connection (an app's steady use of the API); counts what the group
 * receives meanwhile.
 */
async function apicalls(cmd) {
  const group = (groups.get(cmd.group) || []).filter((c) => !c.closed);
  let received = 0;
  for (const c of group) c.onData = () => received++;
  const latencies = [];
  const errors = {};
  const started = now();
  for (let i = 0; i < cmd.count; i++) {
    const t = now();
    try {
      const res = await post(cmd.url, cmd.body, cmd.headers);
      if (res.status >= 300) errors[`HTTP ${res.status}`] = (errors[`HTTP ${res.status}`] || 0) + 1;
    } catch (e) {
      errors[e.message] = (errors[e.message] || 0) + 1;
    }
    latencies.push(now() - t);
  }
  const seconds = (now() - started) / 1000;
  const expected = cmd.count * group.length;
  const deadline = now() + (cmd.drainMs || 10000);
  while (received < expected && now() < deadline) await sleep(20);
  for (const c of group) c.onData = null;
  const mean = latencies.reduce((a, b) => a + b, 0) / Math.max(1, latencies.length);
  return { calls: cmd.count, seconds, errors, expected, received, meanMs: mean, latencyMs: summarize(latencies) };
}

/** sleep: let the clients run on their own for a while (heartbeats go on). */
async function pause(cmd) {
  await sleep(Math.min(cmd.ms, 600000));
  return {};
}

/**
 * stormArm: from now on, each client of the group that is closed (its server
 * restarts) reconnects after a random 0-`jitterMs` delay, as front ends do,
 * and tries again every 100-300 ms while the server is not back (connection
 * refused) or refuses the handshake (counted apart).  Returns at once;
 * stormWait reports.
 */
const storms = new Map(); // group -> state
function stormArm(cmd) {
  const group = groups.get(cmd.group) || [];
  const state = { started: null, back: 0, errors: {}, refused: 0, count: group.length, done: null, firstClose: null };
  storms.set(cmd.group, state);
  const reconnect = (index) => {
    setTimeout(async function attempt() {
      const { client, error } = await openOne(index, cmd);
      if (!error) {
        state.back++;
        const at = group.findIndex((c) => c.index === index);
        if (at >= 0) group[at] = client;
        if (state.back === state.count) state.done = now();
        return;
      }
      state.errors[error] = (state.errors[error] || 0) + 1;
      if (error.startsWith('HTTP ')) state.refused++;
      client.ws.terminate();
      setTimeout(attempt, 100 + Math.random() * 200);
    }, Math.random() * (cmd.jitterMs || 1000));
  };
  const watch = (client) => {
    client.ws.once('close', () => {
      if (state.firstClose === null) state.firstClose = now();
      reconnect(client.index);
    });
  };
  for (const client of group) watch(client);
  return { armed: group.length };
}

/** stormWait: wait (bounded) until every client of the storm is connected again. */
async function stormWait(cmd) {
  const state = storms.get(cmd.group);
  const deadline = now() + (cmd.timeoutMs || 120000);
  while (state.back < state.count && now() < deadline) await sleep(20);
  storms.delete(cmd.group);
  return {
    back: state.back,
    count: state.count,
    seconds: state.done !== null && state.firstClose !== null ? (state.done - state.firstClose) / 1000 : null,
    firstCloseAt: state.firstClose,
    refused: state.refused,
    errors: state.errors,
  };
}

const commands = { open, close, pongs, sleep: pause, fanout, forward, roundtrip, apicalls, stormArm, stormWait };

async function main() {
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let reply;
    try {
      const cmd = JSON.parse(line);
      const run = commands[cmd.cmd];
      if (!run) throw new Error(`unknown command ${cmd.cmd}`);
      reply = { ok: true, cmd: cmd.cmd, ...(await run(cmd)) };
    } catch (e) {
      reply = { ok: false, error: String(e && e.stack ? e.stack : e) };
    }
    process.stdout.write(JSON.stringify(reply) + '\n');
  }
  // stdin closed: the runner is done with us; drop every connection and go.
  for (const group of groups.values()) for (const c of group) c.ws.terminate();
  process.exit(0);
}

main();
