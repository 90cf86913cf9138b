#!/usr/bin/env node
// A minimal wsgw app on Node's plain `http` module (Node 18 or later, no
// packages): it prints each open/message/close event the gateway POSTs and
// answers a message by echoing it to its connection through /tapr/ws/conn/send.
//
//   node examples/node_app.js [PORT (8888)] [GATEWAY (http://127.0.0.1:40010)]
'use strict';
const http = require('http');
const [port = '8888', gateway = 'http://127.0.0.1:40010'] = process.argv.slice(2);

const server = http.createServer((req, res) => {
  let body = '';
  req.on('data', (chunk) => { body += chunk; });
  req.on('end', async () => {
    const event = JSON.parse(body);
    console.log(event.action, event.conn_id, event.user_name, JSON.stringify(event.data));
    if (event.action === 'message') {
      const reply = {conn_id: event.conn_id, payload: {event: 'echo', data: event.data}};
      await fetch(gateway + '/tapr/ws/conn/send', {method: 'POST', body: JSON.stringify(reply)}).catch(console.error);
    }
    res.end('{}');  // answered after the send, so one connection's replies keep their order
  });
});
server.listen(Number(port), '127.0.0.1', () => console.log(`app listening on http://127.0.0.1:${server.address().port}/`));
