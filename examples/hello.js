// The README's Node client ("Clients: the WebSocket at /ws"), as a file:
// connects as alice, says {"event":"ai","data":{}}, pings every 30 s and
// prints what it receives.  Needs `ws`: npm ci --prefix examples.
//
//   node examples/hello.js
const WebSocket = require('ws');
const ws = new WebSocket('ws://127.0.0.1:40010/ws', {headers: {'X-Bfl-User': 'alice'}});
ws.on('open', () => ws.send(JSON.stringify({event: 'ai', data: {}})));
setInterval(() => ws.send('{"event":"ping","data":{}}'), 30000);
ws.on('message', (data) => console.log(String(data)));
