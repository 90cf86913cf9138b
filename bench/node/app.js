'use strict';
/*
 * The benchmark's app: a minimal, fast HTTP server standing in for the
 * application behind each server under test, so that the figures measure the
 * server, not a slow app.
 *
 * One process serves the three dialects, by path:
 *   /wsgw/...     wsgw's event POSTs (JSON {action, conn_id, data, ...});
 *   /pushpin/...  Pushpin's WebSocket-over-HTTP requests (application/websocket-events);
 *   /nchan/...    nchan's publisher upstream requests (the client's message as the body).
 *
 * In "count" mode it counts client messages and checks their order per client
 * (the messages carry {c: client, s: sequence}); in "echo" mode it sends each
 * message straight back to the connection it came from through the server's
 * own push API, as a real app answering a request would; in "reply" mode
 * (wsgw only) it answers the event POST itself with the message, as an
 * inline reply (X-Wsgw-Reply: 1), sparing the push API call.  wsgw's
 * batches (a JSON array of events) are taken in every mode, and so is its
 * connect POST (--connect-url): admitted at once with 200, and counted.
 *
 * Control: POST /control {"mode": "count"|"echo"|"reply"} resets the counters;
 * GET /stats returns them.  Configuration is one JSON argument:
 * {"port", "wsgwSend", "pushpinPublish", "nchanPublish"}.
 */

const http = require('http');
const net = require('net');
const { performance } = require('perf_hooks');

const config = JSON.parse(process.argv[2]);
const now = () => performance.timeOrigin + performance.now();
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

let mode = 'count';
let stats;
let clients;

function reset(newMode) {
  mode = newMode || mode;
  clients = new Map(); // client index -> {seen: Set of sequence numbers, max}
  stats = { mode, requests: 0, connections: 0, connect: 0, open: 0, close: 0, messages: 0, pings: 0, unique: 0, dup: 0, reordered: 0,
    firstAt: null, lastAt: null, echoes: 0, echoErrors: 0, unparsed: 0 };
}
reset('count');

/** Count one client message {c, s} and check it against that client's earlier ones. */
function track(message) {
  const t = now();
  stats.messages++;
  if (stats.firstAt === null) stats.firstAt = t;
  stats.lastAt = t;
  let seq = clients.get(message.c);
  if (!seq) {
    seq = { seen: new Set(), max: -1 };
    clients.set(message.c, seq);
  }
  if (seq.seen.has(message.s)) {
    stats.dup++;
    return;
  }
  seq.seen.add(message.s);
  stats.unique++;
  if (message.s < seq.max) stats.reordered++;
  else seq.max = message.s;
}

/** One POST; resolves when it is answered (or failed), counting the outcome. */
function postOut(url, body) {
  return new Promise((resolve) => {
    const req = http.request(url, {
      method: 'POST',
      agent,
      headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) },
    }, (res) => {
      if (res.statusCode >= 300) stats.echoErrors++;
      else stats.echoes++;
      res.resume();
      res.on('end', resolve);
    });
    req.on('error', () => {
      stats.echoErrors++;
      resolve();
    });
    req.end(body);
  });
}

/**
 * Echo to one connection after its previous echo was answered: the pool's
 * parallel connections would otherwise let two answers to one client pass
 * each other before they reach the server, and W4's order check would
 * measure the app instead of the server.
 */
const echoChains = new Map(); // connection key -> promise of its last echo
function echo(key, url, body) {
  const previous = echoChains.get(key) || Promise.resolve();
  const next = previous.then(() => postOut(url, body));
  echoChains.set(key, next);
  next.then(() => {
    if (echoChains.get(key) === next) echoChains.delete(key);
  });
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch (e) {
    stats.unparsed++;
    return null;
  }
}

// -- wsgw ---------------------------------------------------------------------

function wsgw(body, res) {
  const parsed = parseJson(body.toString());
  const batch = Array.isArray(parsed);
  const event = batch ? null : parsed;
  if (mode === 'reply' && event && event.action === 'message') {
    const reply = JSON.stringify(event.data);
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(reply), 'X-Wsgw-Reply': '1' });
    res.end(reply);
    stats.echoes++;
    return;
  }
  res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': 2 });
  res.end('{}');
  if (!parsed) return;
  if (batch) stats.batches = (stats.batches || 0) + 1;
  for (const one of batch ? parsed : [parsed]) {
    if (one.action === 'connect') stats.connect++;
    else if (one.action === 'open') stats.open++;
    else if (one.action === 'close') stats.close++;
    else if (one.action === 'message') {
      if (mode === 'echo') echo(one.conn_id, config.wsgwSend, JSON.stringify({ payload: one.data, conn_id: one.conn_id }));
      else track(one.data);
    }
  }
}

// -- Pushpin (GRIP WebSocket-over-HTTP) ------------------------------------------

/** The events of an application/websocket-events body: "TYPE[ hexlen]\r\n[content\r\n]" each. */
function parseWsEvents(buf) {
  const events = [];
  let pos = 0;
  while (pos < buf.length) {
    const eol = buf.indexOf('\r\n', pos);
    if (eol < 0) break;
    const line = buf.toString('latin1', pos, eol);
    const space = line.indexOf(' ');
    pos = eol + 2;
    let content = null;
    if (space >= 0) {
      const length = parseInt(line.slice(space + 1), 16);
      content = buf.subarray(pos, pos + length);
      pos += length + 2;
    }
    events.push({ type: space < 0 ? line : line.slice(0, space), content });
  }
  return events;
}

function wsEvent(type, content) {
  if (content === undefined) return Buffer.from(`${type}\r\n`);
  const bytes = Buffer.isBuffer(content) ? content : Buffer.from(content);
  return Buffer.concat([Buffer.from(`${type} ${bytes.length.toString(16)}\r\n`), bytes, Buffer.from('\r\n')]);
}

const PONG = '{"event":"pong"}';

function pushpin(req, body, res) {
  const connId = req.headers['connection-id'];
  // A connection listens on the channel its URL names (?ch=), else on its own.
  const channel = new URL(req.url, 'http://x').searchParams.get('ch') || `conn-${connId}`;
  const out = [];
  const headers = { 'Content-Type': 'application/websocket-events' };
  for (const event of parseWsEvents(body)) {
    if (event.type === 'OPEN') {
      stats.open++;
      headers['Sec-WebSocket-Extensions'] = 'grip';
      out.push(wsEvent('OPEN'));
      out.push(wsEvent('TEXT', 'c:' + JSON.stringify({ type: 'subscribe', channel })));
    } else if (event.type === 'TEXT') {
      const text = event.content.toString();
      const message = parseJson(text);
      if (message && message.event === 'ping') {
        stats.pings++;
        // The heartbeat, answered by the app (Pushpin has no such feature);
        // with GRIP on, text for the client carries the "m:" prefix.
        out.push(wsEvent('TEXT', 'm:' + PONG));
      } else if (message && mode === 'echo') {
        echo(connId, config.pushpinPublish, JSON.stringify({ items: [{ channel: `conn-${connId}`, formats: { 'ws-message': { content: text } } }] }));
      } else if (message) {
        track(message);
      }
    } else if (event.type === 'CLOSE') {
      stats.close++;
      out.push(wsEvent('CLOSE', event.content || Buffer.alloc(0)));
    } else if (event.type === 'DISCONNECT') {
      stats.close++;
    }
  }
  const payload = Buffer.concat(out);
  headers['Content-Length'] = payload.length;
  res.writeHead(200, headers);
  res.end(payload);
}

// -- nchan (publisher upstream request) --------------------------------------------

function nchan(body, res) {
  // 204: nchan does not publish the client's message; the app decides what goes out.
  res.writeHead(204);
  res.end();
  const text = body.toString();
  const message = parseJson(text);
  if (!message) return;
  if (mode === 'echo') echo(message.c, `${config.nchanPublish}?id=c${message.c}`, text);
  else track(message);
}

// -- the server ------------------------------------------------------------------
//
// HTTP/1.1 over `net`, not Node's `http` module: in W1 the app shares the load
// core with the load generator, and `http`'s request and response objects
// cost it about as much per open event as the rest of the app.  The answers
// are the bytes Node's `http` server writes for the same calls (status line,
// the handler's headers in order, Date, Connection and Keep-Alive, chunked
// when no length is given), so a server under test reads exactly what it
// read before; tests/test_bench_app.py pins them.  Requests are read as
// Node reads them where the bench needs it: a Content-Length or chunked
// body, keep-alive (HTTP/1.0 only when asked), pipelined requests answered
// in order, anything unreadable answered 400 and the connection closed.

const { STATUS_CODES } = http;
const KEEP_ALIVE_SECONDS = 120;
const MAX_HEAD = 64 * 1024;

let dateLine = '';
let dateSecond = -1;
/** Node's Date header, formatted once a second. */
function httpDate() {
  const second = Math.floor(Date.now() / 1000);
  if (second !== dateSecond) {
    dateSecond = second;
    dateLine = new Date(second * 1000).toUTCString();
  }
  return dateLine;
}

/** The answer to one request: writeHead() and end() as Node's ServerResponse has them. */
class Answer {
  constructor(keepAlive, out) {
    this.keepAlive = keepAlive;
    this.out = out; // the connection's answers so far in this read, written together
    this.status = 200;
    this.headers = null;
  }

  writeHead(status, headers) {
    this.status = status;
    this.headers = headers || null;
  }

  end(body) {
    const payload = body === undefined ? null : Buffer.isBuffer(body) ? body : Buffer.from(body);
    let head = `HTTP/1.1 ${this.status} ${STATUS_CODES[this.status] || 'unknown'}\r\n`;
    let length = false;
    if (this.headers) {
      for (const name of Object.keys(this.headers)) {
        head += `${name}: ${this.headers[name]}\r\n`;
        if (name.toLowerCase() === 'content-length') length = true;
      }
    }
    head += `Date: ${httpDate()}\r\n`;
    head += this.keepAlive ? `Connection: keep-alive\r\nKeep-Alive: timeout=${KEEP_ALIVE_SECONDS}\r\n` : 'Connection: close\r\n';
    const bodyless = this.status === 204 || this.status === 304;
    if (bodyless || length) {
      this.out.push(Buffer.from(head + '\r\n'));
      if (!bodyless && payload) this.out.push(payload);
    } else if (payload && payload.length) {
      this.out.push(Buffer.from(`${head}Transfer-Encoding: chunked\r\n\r\n${payload.length.toString(16)}\r\n`));
      this.out.push(payload);
      this.out.push(Buffer.from('\r\n0\r\n\r\n'));
    } else {
      this.out.push(Buffer.from(`${head}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n`));
    }
  }
}

function handle(req, body, res) {
  stats.requests++;
  if (req.url === '/stats') {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify(stats));
  } else if (req.url === '/control') {
    reset((parseJson(body.toString()) || {}).mode);
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({ mode }));
  } else if (req.url.startsWith('/wsgw')) {
    wsgw(body, res);
  } else if (req.url.startsWith('/pushpin')) {
    pushpin(req, body, res);
  } else if (req.url.startsWith('/nchan')) {
    nchan(body, res);
  } else {
    res.writeHead(404);
    res.end();
  }
}

class BadRequest extends Error {}

/** A request head: {method, url, version, headers (lower-case names)}. */
function parseHead(text) {
  const lines = text.split('\r\n');
  const first = /^([A-Z]+) (\S+) HTTP\/(1\.[01])$/.exec(lines[0]);
  if (!first) throw new BadRequest('request line');
  const headers = {};
  for (let i = 1; i < lines.length; i++) {
    const colon = lines[i].indexOf(':');
    if (colon <= 0) throw new BadRequest('header line');
    const name = lines[i].slice(0, colon).toLowerCase();
    const value = lines[i].slice(colon + 1).trim();
    headers[name] = name in headers ? `${headers[name]}, ${value}` : value;
  }
  return { method: first[1], url: first[2], version: first[3], headers };
}

/**
 * A chunked body from buf at pos: {body, end} once it is all there (trailers
 * read and dropped), null while more is to come.
 */
function readChunked(buf, pos) {
  const parts = [];
  for (;;) {
    const eol = buf.indexOf('\r\n', pos);
    if (eol < 0) return null;
    const size = parseInt(buf.toString('latin1', pos, eol).split(';')[0], 16);
    if (Number.isNaN(size) || size < 0) throw new BadRequest('chunk size');
    pos = eol + 2;
    if (size === 0) {
      const end = buf.indexOf('\r\n\r\n', pos - 2);
      if (end < 0) return null;
      return { body: Buffer.concat(parts), end: end + 4 };
    }
    if (buf.length < pos + size + 2) return null;
    parts.push(buf.subarray(pos, pos + size));
    pos += size + 2;
  }
}

function serve(socket) {
  stats.connections++;
  let pending = Buffer.alloc(0);
  socket.setNoDelay(true);
  socket.setTimeout((KEEP_ALIVE_SECONDS + 5) * 1000, () => socket.destroy());
  socket.on('error', () => socket.destroy());
  socket.on('data', (data) => {
    let buf = pending.length ? Buffer.concat([pending, data]) : data;
    const out = [];
    let close = false;
    try {
      while (buf.length && !close) {
        const headEnd = buf.indexOf('\r\n\r\n');
        if (headEnd < 0) {
          if (buf.length > MAX_HEAD) throw new BadRequest('head too long');
          break;
        }
        const req = parseHead(buf.toString('latin1', 0, headEnd));
        const start = headEnd + 4;
        let body;
        let end;
        if (req.headers['transfer-encoding'] !== undefined) {
          if (req.headers['transfer-encoding'].toLowerCase() !== 'chunked') throw new BadRequest('transfer-encoding');
          const chunked = readChunked(buf, start);
          if (chunked === null) break;
          ({ body, end } = chunked);
        } else {
          const length = req.headers['content-length'] === undefined ? 0 : Number(req.headers['content-length']);
          if (!Number.isInteger(length) || length < 0) throw new BadRequest('content-length');
          if (buf.length < start + length) break;
          body = buf.subarray(start, start + length);
          end = start + length;
        }
        buf = buf.subarray(end);
        const connection = (req.headers.connection || '').toLowerCase();
        const keepAlive = req.version === '1.1' ? connection !== 'close' : connection === 'keep-alive';
        handle(req, body, new Answer(keepAlive, out));
        close = !keepAlive;
      }
    } catch (e) {
      if (!(e instanceof BadRequest)) throw e;
      out.push(Buffer.from('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n'));
      close = true;
    }
    pending = close ? Buffer.alloc(0) : Buffer.from(buf); // a copy: data's memory is not ours to keep
    if (out.length) socket.write(out.length === 1 ? out[0] : Buffer.concat(out));
    if (close) socket.end();
  });
}

const server = net.createServer(serve);
server.listen(config.port, '127.0.0.1', () => process.stdout.write(JSON.stringify({ listening: server.address().port }) + '\n'));
