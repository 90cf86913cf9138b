// The chat page's client: plain JavaScript, no build step.
// The gateway's URL: ?ws=ws://127.0.0.1:40010/ws, else /ws on this page's host
// (in production the page and /ws sit behind the same authenticating proxy).
(function () {
  'use strict';
  var PING_EVERY = 30000;   // ms between heartbeats
  var PONG_WITHIN = 10000;  // ms a pong may take before the connection counts as dead
  var FIRST_DELAY = 1000;   // reconnect back-off: 1 s doubling ...
  var MAX_DELAY = 30000;    // ... to 30 s

  var params = new URLSearchParams(location.search);
  var url = params.get('ws') || (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
  var body = document.body;
  var $ = function (id) { return document.getElementById(id); };
  var ws = null, delay = FIRST_DELAY, opens = 0, lastError = null;
  var pingTimer = null, pongTimer = null, retryTimer = null;

  function setStatus(text, state) {
    $('status').textContent = text;
    body.dataset.state = state;
  }

  function enable(on) {
    $('text').disabled = $('send').disabled = !on;
  }

  function send(message) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
  }

  // What to check when a socket on another origin than the page's fails.
  function hint() {
    var host;
    try { host = new URL(url, location.href).host; } catch (e) { return ''; }
    if (host === location.host) return '';
    return ' (is the gateway running, and started with --allowed-origin ' + location.origin + '?)';
  }

  function connect() {
    retryTimer = null;
    if (lastError) setStatus('connecting… (last attempt: ' + lastError + ')', 'error');
    else setStatus('connecting…', 'connecting');
    var sock;
    try {
      sock = ws = new WebSocket(url);
    } catch (e) {  // a malformed ?ws= URL: retrying would not help
      setStatus('cannot connect to ' + url + ': ' + e.message, 'failed');
      return;
    }
    var opened = false;
    sock.onopen = function () {
      if (sock !== ws) return;
      opened = true;
      lastError = null;
      delay = FIRST_DELAY;
      body.dataset.opens = String(++opens);
      setStatus('connected', 'open');
      enable(true);
      pingTimer = setInterval(ping, PING_EVERY);
    };
    sock.onmessage = function (e) { if (sock === ws) receive(e.data); };
    sock.onclose = function (e) {
      if (sock !== ws) return;
      if (opened) reconnect('closed (' + e.code + ')', 'waiting');
      // Never opened: refused (a browser hides the HTTP status: an origin the
      // gateway does not allow, 403, looks the same as no gateway at all).
      else {
        lastError = 'cannot connect to ' + url + ': refused or unreachable' + hint();
        reconnect(lastError, 'error');
      }
    };
  }

  function ping() {
    send({event: 'ping', data: {}});
    if (!pongTimer) pongTimer = setTimeout(function () { reconnect('no pong', 'waiting'); }, PONG_WITHIN);
  }

  function reconnect(why, state) {
    var sock = ws;
    ws = null;
    clearInterval(pingTimer);
    clearTimeout(pongTimer);
    pingTimer = pongTimer = null;
    enable(false);
    if (sock) {
      sock.onopen = sock.onmessage = sock.onclose = null;
      if (sock.readyState < WebSocket.CLOSING) sock.close();
    }
    if (retryTimer) return;
    setStatus(why + '; reconnecting in ' + delay / 1000 + ' s', state || 'waiting');
    retryTimer = setTimeout(connect, delay);
    delay = Math.min(delay * 2, MAX_DELAY);
  }

  function receive(text) {
    var message;
    try { message = JSON.parse(text); } catch (e) { return; }
    if (!message || typeof message !== 'object') return;
    var data = message.data || {};
    if (message.event === 'pong') {
      clearTimeout(pongTimer);
      pongTimer = null;
    } else if (message.event === 'hello') {
      body.dataset.user = data.user;
      setStatus('connected as ' + data.user, 'open');
    } else if (message.event === 'presence') {
      $('online').textContent = 'online: ' + (data.online || []).join(', ');
    } else if (message.event === 'chat') {
      show(String(data.from), String(data.text));
    }
  }

  function show(from, text) {
    var item = document.createElement('li');
    var who = document.createElement('span');
    var what = document.createElement('span');
    who.className = 'from';
    who.textContent = from;
    what.className = 'text';
    what.textContent = text;
    item.appendChild(who);
    item.appendChild(what);
    $('messages').appendChild(item);
    item.scrollIntoView({block: 'nearest'});
  }

  $('form').addEventListener('submit', function (e) {
    e.preventDefault();
    var text = $('text').value.trim();
    if (!text || !ws || ws.readyState !== WebSocket.OPEN) return;
    send({event: 'chat', data: {text: text}});
    $('text').value = '';
  });

  connect();
})();
