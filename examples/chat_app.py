#!/usr/bin/env python3
"""
A small chat app behind wsgw (Twisted and treq only).

It serves the chat page (static/index.html and static/chat.js) and takes
the gateway's event POSTs at /ws/message:

- open: remembers the connection and its user, says hello to it and tells
  everyone who is online;
- message {"event":"chat","data":{"text":"..."}}: broadcasts
  {"event":"chat","data":{"from":<user>,"text":"..."}} to every user online;
- close: forgets the connection and tells everyone who is still online.

Everything it says goes through the gateway's /tapr/ws/conn/send.

    .venv/bin/twist wsgw --allowed-origin http://127.0.0.1:8888 --app-url http://127.0.0.1:8888/ws/message
    .venv/bin/python examples/chat_app.py --port 8888 --gateway http://127.0.0.1:40010

then open http://127.0.0.1:8888/?ws=ws://127.0.0.1:40010/ws (examples/README.rst).
"""

import argparse
import ipaddress
import json
import sys
from collections import OrderedDict
from pathlib import Path

import treq
from twisted.internet import defer, reactor
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import File

STATIC = Path(__file__).resolve().parent / "static"
ANONYMOUS = "anonymous"
MAX_TEXT = 2000  # characters of one chat line
REMEMBERED_EVENT_IDS = 10000

log = Logger(namespace="chat")


def chat_text(message):
    """The text of a client's chat message, or None when it is something else."""
    if not isinstance(message, dict) or message.get("event") != "chat":
        return None
    data = message.get("data")
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        return None
    return text.strip()[:MAX_TEXT]


class Chat:
    """Who is connected, and what to tell them."""

    def __init__(self, gateway, admin_token=None):
        self.api = gateway.rstrip("/") + "/tapr/ws/conn/"
        self.headers = {"Content-Type": "application/json"}
        if admin_token:
            self.headers["Authorization"] = "Bearer " + admin_token
        self.conns = {}  # conn_id -> user name
        self.seen = OrderedDict()  # recent X-Wsgw-Event-Id values

    def online(self):
        return sorted({name or ANONYMOUS for name in self.conns.values()})

    def first_time(self, event_id):
        """
        False for an event id already handled: the gateway delivers at least
        once, so a retried event may arrive twice.
        """
        if not event_id:
            return True
        if event_id in self.seen:
            return False
        self.seen[event_id] = True
        while len(self.seen) > REMEMBERED_EVENT_IDS:
            self.seen.popitem(last=False)
        return True

    async def handle(self, event):
        action = event.get("action")
        conn_id = event.get("conn_id")
        name = event.get("user_name") or ""
        if action == "open":
            self.conns[conn_id] = name
            await self.send({"event": "hello", "data": {"user": name or ANONYMOUS}}, conn_id=conn_id)
            await self.presence()
        elif action == "close":
            if self.conns.pop(conn_id, None) is not None:
                await self.presence()
        elif action == "message":
            self.conns.setdefault(conn_id, name)  # opened before this app started
            text = chat_text(event.get("data"))
            if text is not None:
                await self.broadcast({"event": "chat", "data": {"from": name or ANONYMOUS, "text": text}})

    async def presence(self):
        await self.broadcast({"event": "presence", "data": {"online": self.online()}})

    async def broadcast(self, payload):
        users = sorted(set(self.conns.values()))
        if users:
            await self.send(payload, users=users)

    async def send(self, payload, **targets):
        """POST to the gateway's send API; the number of connections reached."""
        body = json.dumps({"payload": payload, **targets}).encode()
        try:
            response = await treq.post(self.api + "send", body, headers=self.headers, timeout=5)
            answer = await treq.json_content(response)
        except Exception as e:
            log.warn("send to the gateway failed: {error}", error=e)
            return 0
        if answer.get("code") != 0:
            log.warn("the gateway refused a send: {message}", message=answer.get("message"))
            return 0
        return answer["data"]["matched"]

    async def sync(self):
        """Learn the connections opened before this app started (/tapr/ws/conn/list)."""
        try:
            response = await treq.get(self.api + "list", headers=self.headers, timeout=5)
            answer = await treq.json_content(response)
            entries = answer["data"] if answer.get("code") == 0 else []
        except Exception as e:
            log.warn("could not list the gateway's connections: {error}", error=e)
            return
        for entry in entries:
            for conn in entry["conns"] + entry["public_conns"]:
                self.conns.setdefault(conn["id"], entry["name"])
        log.info("{n} connections open at start", n=len(self.conns))


def loopback(address):
    host = getattr(address, "host", None)
    if host is None:  # a UNIX socket peer
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Events(Resource):
    """/ws/message: the gateway's event POSTs, answered once handled."""

    isLeaf = True

    def __init__(self, chat):
        super().__init__()
        self.chat = chat

    def render_POST(self, request):
        # The gateway runs beside the app; nobody else may inject events.
        if not loopback(request.getClientAddress()):
            request.setResponseCode(403)
            return b'{"error":"events come from the gateway on this host only"}'
        try:
            event = json.loads(request.content.read())
        except ValueError:
            request.setResponseCode(400)
            return b'{"error":"not JSON"}'
        if not isinstance(event, dict):
            request.setResponseCode(400)
            return b'{"error":"not an event"}'
        event_id = (request.getHeader(b"x-wsgw-event-id") or b"").decode("latin-1")
        if not self.chat.first_time(event_id):
            return b"{}"
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def answer(status):
            if not gone:
                request.setResponseCode(status)
                request.write(b"{}")
                request.finish()

        def failed(failure):
            log.failure("handling an event failed", failure)
            self.chat.seen.pop(event_id, None)  # let the gateway's retry in
            answer(500)

        # Answered after the sends it causes, so one connection's broadcasts
        # keep its order (the gateway posts its next event after this answer).
        d = defer.ensureDeferred(self.chat.handle(event))
        d.addCallbacks(lambda _: answer(200), failed)
        return NOT_DONE_YET


def make_site(chat):
    root = File(str(STATIC))  # /, /index.html, /chat.js
    ws = Resource()
    ws.putChild(b"message", Events(chat))
    root.putChild(b"ws", ws)
    return Site(root)


def main(argv=None):
    parser = argparse.ArgumentParser(description="A chat app behind the wsgw WebSocket gateway.")
    parser.add_argument("--port", type=int, default=8888, help="port for the page and the events (0: any)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--gateway", default="http://127.0.0.1:40010", help="the gateway's API base URL")
    parser.add_argument("--admin-token-file", help="file holding the gateway's --admin-token")
    args = parser.parse_args(argv)

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    token = Path(args.admin_token_file).read_text().strip() if args.admin_token_file else None
    chat = Chat(args.gateway, token)
    port = reactor.listenTCP(args.port, make_site(chat), interface=args.interface)
    log.info(
        "chat app listening on http://{host}:{port}/ (events at /ws/message, gateway {gateway})",
        host=args.interface,
        port=port.getHost().port,
        gateway=args.gateway,
    )
    reactor.callWhenRunning(lambda: defer.ensureDeferred(chat.sync()))
    reactor.run()


if __name__ == "__main__":
    main()
