'use strict';
/*
 * The app's own cost per request, without a server under test: `total` open
 * events POSTed to node/app.js over 64 keep-alive connections, one in flight
 * on each, as wsgw's pool sends them.  Run the app pinned to one core and this
 * to the other, and read the app's CPU from /proc (bench/README.md).
 *
 *   node appload.js PORT TOTAL
 */
const net = require('net');

const port = Number(process.argv[2]);
const total = Number(process.argv[3] || 40000);
const body = JSON.stringify({ action: 'open', conn_id: 'abcdef:1', user_name: 'u1', token: '', user_agent: 'node', remote_addr: '127.0.0.1', data: {} });
const request = Buffer.from(
  `POST /wsgw/ev HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nContent-Type: application/json\r\nX-Wsgw-Event-Id: abcdef:1:0\r\n` +
    `X-Forwarded-For: 127.0.0.1\r\nAccept-Encoding: gzip\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
);
let sent = 0;
let answered = 0;
const started = Date.now();
for (let i = 0; i < 64; i++) {
  const socket = net.connect(port, '127.0.0.1', () => {
    sent++;
    socket.write(request);
  });
  socket.on('data', () => { // the app's answers are small: one per read
    answered++;
    if (answered === total) {
      console.log(JSON.stringify({ requests: total, ms: Date.now() - started }));
      process.exit(0);
    }
    if (sent < total) {
      sent++;
      socket.write(request);
    }
  });
}
