// An app whose idle keep-alive connections close after argv[2] ms.
//   node keepalive_app.js MS        Node's own http server, server.keepAliveTimeout = MS
//                                   (its answers say "Keep-Alive: timeout=<MS in whole s>")
//   node keepalive_app.js MS nohint the same answers written over net, without that
//                                   header, as servers behind some proxies send them
// Prints {"listening": port}, then {"connections": n} for each new connection.
"use strict";
const http = require("http");
const net = require("net");

const idleMs = Number(process.argv[2] || 200);
const hint = process.argv[3] !== "nohint";
let connections = 0;

function counted(socket) {
  connections += 1;
  console.log(JSON.stringify({ connections }));
}

let server;
if (hint) {
  server = http.createServer((req, res) => {
    req.resume();
    req.on("end", () => {
      res.writeHead(200, { "Content-Length": "2" });
      res.end("ok");
    });
  });
  server.keepAliveTimeout = idleMs;
  server.on("connection", counted);
} else {
  server = net.createServer((socket) => {
    counted(socket);
    let buffer = Buffer.alloc(0);
    let timer = null;
    const idle = () => {
      clearTimeout(timer);
      timer = setTimeout(() => socket.destroy(), idleMs);
    };
    idle();
    socket.on("data", (data) => {
      buffer = Buffer.concat([buffer, data]);
      for (;;) {
        const end = buffer.indexOf("\r\n\r\n");
        if (end < 0) return;
        const head = buffer.subarray(0, end).toString("latin1");
        const match = /\r\ncontent-length:\s*(\d+)/i.exec(head);
        const length = match ? Number(match[1]) : 0;
        if (buffer.length < end + 4 + length) return;
        buffer = buffer.subarray(end + 4 + length);
        socket.write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        idle();
      }
    });
    socket.on("error", () => {});
    socket.on("close", () => clearTimeout(timer));
  });
}
server.listen(0, "127.0.0.1", () => {
  console.log(JSON.stringify({ listening: server.address().port }));
});
