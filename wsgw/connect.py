"""
The app decides who connects (C{--connect-url}): before a handshake is
answered, the gateway POSTs the connection's identity to the app and waits,
without blocking anything else, for its verdict.

  - a 2xx answer admits the connection (its C{conn_id} is the one the app
    saw; the C{open} event follows as usual);
  - a 4xx answer refuses the handshake with that status, passing the app's
    body to the client when it is a JSON object of at most 4 KiB;
  - no answer within C{--connect-timeout}, a 5xx, or an app that cannot be
    reached refuses with 503 and C{Retry-After}: the gateway fails closed.
    Such an outage is logged when it begins and when it ends, not per
    client.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import attr
import treq
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from .admission import Refusal
from .appagent import PreparedURL
from .interfaces import IConnectHook
from .jsonio import decode_json, to_json
from .registry import Connection

log = Logger()

#: The largest app answer passed on to a refused client.
MAX_REFUSAL_BODY = 4 * 1024


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Verdict:
    """The app's word on one handshake: admitted, or the refusal to send."""

    refusal: Optional[Refusal] = None
    #: What an operator counts it under: admitted, refused, timeout,
    #: app_error (5xx) or unreachable.
    result: str = "admitted"

    @property
    def admitted(self) -> bool:
        return self.refusal is None


def connect_request(conn: Connection) -> bytes:
    return to_json(
        {
            "action": "connect",
            "conn_id": conn.conn_id,
            "user_name": conn.user_name,
            "token": conn.token,
            "access_public": conn.access_public,
            "user_agent": conn.user_agent,
            "remote_addr": conn.remote_addr,
            "data": {},
        }
    )


def _header_value(text: str) -> bytes:
    # Header values came from the client's own request head, where CR and LF
    # cannot be; replace anything odd rather than fail the handshake.
    return text.encode("utf-8", "replace").replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\0", b" ")


def _refusal_body(status: int, body: bytes) -> bytes:
    """The app's own body when it is a small JSON object; else the gateway's."""
    if len(body) <= MAX_REFUSAL_BODY:
        try:
            if isinstance(decode_json(body.decode("utf-8")), dict):
                return body.strip() + b"\n"
        except (UnicodeDecodeError, ValueError, RecursionError):
            pass
    return to_json({"code": status, "message": "the app refused this connection"}) + b"\n"


@implementer(IConnectHook)
@attr.s(eq=False)
class ConnectHook:
    """
    Asks the app at C{url} about each handshake, through C{client} (a treq
    C{HTTPClient}), within C{timeout} seconds.
    """

    client: HTTPClient = attr.ib()
    url: str = attr.ib()
    clock: IReactorTime = attr.ib()
    timeout: float = attr.ib(default=2.0)
    #: Verdicts by result, for /metrics.
    counts: Dict[str, int] = attr.ib(factory=dict)
    #: Handshakes the app is being asked about now.
    asking: int = attr.ib(default=0)
    _parsed_url: EncodedURL = attr.ib(init=False)
    #: The app failed the last handshake it was asked about (timeout, 5xx,
    #: unreachable): said once when it begins and once when it ends.
    _failing: bool = attr.ib(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._parsed_url = PreparedURL.of(self.url)

    def admit(self, conn: Connection) -> Deferred[Verdict]:
        """
        The app's verdict on C{conn}; never fails (a failure is a 503
        verdict).  Cancelling it (the client hung up) abandons the request.
        """
        headers = Headers(
            {b"Content-Type": [b"application/json"], b"X-Forwarded-For": [_header_value(conn.remote_addr)]}
        )
        if conn.cookie:
            headers.setRawHeaders(b"Cookie", [_header_value(conn.cookie)])
        d: Deferred[Any] = self.client.post(
            self._parsed_url, data=connect_request(conn), headers=headers, allow_redirects=False, unbuffered=True
        )
        self.asking += 1
        d.addCallback(self._answered)
        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._timed_out)
        d.addErrback(self._failed)
        d.addBoth(self._done)
        return d

    def _done(self, result: Any) -> Any:
        self.asking -= 1
        if isinstance(result, Verdict):
            self._count(result)
        return result

    def _answered(self, response: IResponse) -> Deferred[Verdict]:
        status = response.code

        def judge(body: bytes) -> Verdict:
            if 200 <= status < 300:
                return Verdict()
            if 400 <= status < 500:
                return Verdict(Refusal(status, "refused by the app", "app", _refusal_body(status, body)), "refused")
            return self._unavailable("app_error", f"it answered HTTP {status}")

        return treq.content(response).addCallback(judge)

    def _timed_out(self, _result: Any, timeout: float) -> Verdict:
        return self._unavailable("timeout", f"no answer within {timeout}s")

    def _failed(self, failure: Failure) -> Any:
        if failure.check(CancelledError):
            return failure  # the caller's: the client hung up
        return self._unavailable(
            "unreachable", failure.getErrorMessage() or (failure.type.__name__ if failure.type is not None else "")
        )

    def _unavailable(self, result: str, why: str) -> Verdict:
        if not self._failing:
            self._failing = True
            log.warn(
                "the connect URL {url} does not decide ({why}); refusing handshakes with 503 until it does",
                url=self.url,
                why=why,
            )
        return Verdict(
            Refusal(503, "the app cannot admit connections right now; try again later", f"connect_{result}"), result
        )

    def _count(self, verdict: Verdict) -> None:
        self.counts[verdict.result] = self.counts.get(verdict.result, 0) + 1
        if self._failing and verdict.result in ("admitted", "refused"):
            self._failing = False
            log.info("the connect URL {url} decides again", url=self.url)
