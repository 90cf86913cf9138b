// A `ws` client driven over stdin/stdout by the test suite.
// Usage: node client.js URL [HEADERS_JSON]
// stdin, one JSON per line: {"send": "text"} | {"binary": "base64"} | {"close": [code, reason]} | {"ping": true}
// stdout, one JSON per line: {"open": protocol} | {"message": text, "binary": bool} | {"close": code, "reason": text} | {"error": text} | {"pinged": true}
const WebSocket = require('ws');
const readline = require('readline');

const [url, headersJson] = process.argv.slice(2);
const headers = headersJson ? JSON.parse(headersJson) : {};
const protocols = headers['Sec-WebSocket-Protocol'];
delete headers['Sec-WebSocket-Protocol'];
const options = { headers };
// WS_CA_FILE: a PEM certificate to trust for wss:// (tests make their own).
if (process.env.WS_CA_FILE) options.ca = require('fs').readFileSync(process.env.WS_CA_FILE);
const ws = protocols
  ? new WebSocket(url, protocols.split(',').map((p) => p.trim()), options)
  : new WebSocket(url, options);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

ws.on('open', () => out({ open: ws.protocol }));
ws.on('message', (data, isBinary) =>
  out({ message: isBinary ? data.toString('base64') : data.toString('utf8'), binary: isBinary }));
ws.on('close', (code, reason) => { out({ close: code, reason: reason.toString() }); process.exit(0); });
// ws answers every ping with a pong by itself; say that one came.
ws.on('ping', () => out({ pinged: true }));
ws.on('error', (err) => out({ error: String(err.message || err) }));
ws.on('unexpected-response', (req, res) => { out({ error: `HTTP ${res.statusCode}` }); process.exit(0); });

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const cmd = JSON.parse(line);
  if ('send' in cmd) ws.send(cmd.send);
  else if ('binary' in cmd) ws.send(Buffer.from(cmd.binary, 'base64'), { binary: true });
  else if ('close' in cmd) ws.close(...cmd.close);
});
