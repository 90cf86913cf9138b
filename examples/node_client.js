#!/usr/bin/env node
// A command-line chat client for the example app, on the Node `ws` library.
//
//   node examples/node_client.js [--url ws://127.0.0.1:40010/ws] [--user NAME] [--] [words to say...]
//
// It connects, pings every 30 s as the gateway expects, prints every message
// it receives (chat lines as "from: text", anything else as its JSON) and,
// once connected, says the words given.
// Outside a proxy it sets the user header itself (--user, sent as
// X-Bfl-User); a real deployment's proxy sets it instead. Ctrl-C quits.
'use strict';

const USAGE = `usage: node examples/node_client.js [--url URL] [--user NAME] [--] [WORDS...]

A terminal client for the example chat: connects to the gateway, pings every
30 s, prints what it receives and, once connected, says WORDS to the chat.

  --url URL    the gateway's WebSocket (default ws://127.0.0.1:40010/ws)
  --user NAME  sent as the X-Bfl-User header (only without a proxy in front)
  --           the rest are words, even those starting with "-"
  -h, --help   this text
`;

function parse(argv) {
  const options = {url: 'ws://127.0.0.1:40010/ws', user: '', words: []};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') { options.words.push(...argv.slice(i + 1)); break; }
    if (arg === '-h' || arg === '--help') { process.stdout.write(USAGE); process.exit(0); }
    if (arg === '--url' || arg === '--user') {
      if (i + 1 >= argv.length) fail(`${arg} needs a value`);
      options[arg.slice(2)] = argv[++i];
    } else if (arg.startsWith('-') && arg !== '-') fail(`unknown option ${arg}`);
    else options.words.push(arg);
  }
  return options;
}

function fail(message) {
  process.stderr.write(`node_client.js: ${message} (see --help)\n`);
  process.exit(2);
}

const options = parse(process.argv.slice(2));
let WebSocket;
try {
  WebSocket = require('ws');  // cd examples && npm ci
} catch (e) {
  WebSocket = require('../tests/node/node_modules/ws');  // or the test suite's copy
}
const headers = options.user ? {'X-Bfl-User': options.user} : {};
const ws = new WebSocket(options.url, {headers});
let pinger = null;

ws.on('open', () => {
  console.error(`connected to ${options.url}`);
  pinger = setInterval(() => ws.send('{"event":"ping","data":{}}'), 30000);
  const text = options.words.join(' ').trim();
  if (text) ws.send(JSON.stringify({event: 'chat', data: {text}}));
});
ws.on('message', (data) => {
  let message = null;
  try { message = JSON.parse(String(data)); } catch (e) { /* printed as it came */ }
  if (message && message.event === 'pong') return;
  if (message && message.event === 'chat' && message.data) console.log(`${message.data.from}: ${message.data.text}`);
  else console.log(String(data));
});
ws.on('unexpected-response', (request, response) => {
  console.error(`refused: HTTP ${response.statusCode}`);
  process.exit(1);
});
ws.on('error', (err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
ws.on('close', (code, reason) => {
  clearInterval(pinger);
  console.error(`closed: ${code} ${reason}`);
  process.exit(0);
});
process.on('SIGINT', () => ws.close(1000, 'bye'));
