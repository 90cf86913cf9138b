"""
A stand-alone app for fault tests: receives the gateway's event POSTs and
prints each accepted event as one JSON line on stdout.

    python app_server.py PORT [--fail-first N] [--delay SECONDS]

--fail-first N answers 500 to the first N attempts of each event (by its
X-Wsgw-Event-Id) before accepting it; --delay holds every answer.
"""

import argparse
import json
import sys
from collections import Counter

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


class App(Resource):
    isLeaf = True

    def __init__(self, fail_first, delay):
        super().__init__()
        self.fail_first = fail_first
        self.delay = delay
        self.attempts = Counter()

    def render_POST(self, request):
        body = json.loads(request.content.read())
        event_id = (request.getHeader(b"x-wsgw-event-id") or b"").decode()
        self.attempts[event_id] += 1
        if self.attempts[event_id] <= self.fail_first:
            request.setResponseCode(500)
            return b"not yet"
        line = json.dumps({"id": event_id, "event": body}) + "\n"
        if not self.delay:
            sys.stdout.write(line)
            sys.stdout.flush()
            return b"{}"

        def answer():
            sys.stdout.write(line)
            sys.stdout.flush()
            request.write(b"{}")
            request.finish()

        reactor.callLater(self.delay, answer)
        return NOT_DONE_YET


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    port = reactor.listenTCP(args.port, Site(App(args.fail_first, args.delay)), interface="127.0.0.1")
    sys.stdout.write(json.dumps({"listening": port.getHost().port}) + "\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
