"""
The seams between the gateway's parts, named as Twisted names its own
(C{IAgent}, C{IPushProducer}): what each side may call, so that a reader,
mypy and a test double all see the same contract.

  - L{IChannel}: what carries frames to one client (the WebSocket protocol
    in the daemon); the gateway drives it.
  - L{IEventSink}: where the forwarder posts one event, one attempt at a
    time (the app client in the daemon).
  - L{IReadThrottle}: how the forwarder asks that a client with too large
    a backlog be read no more for a while.
  - L{IReplies}: where the app's inline replies to events go.
  - L{IMembership}: who hears of connections joining and leaving the
    registry (a cluster node mirrors them into Redis).
  - L{IEventQueue}: where events wait for the app, in order per stream
    (the forwarder), and how a new stream is held until its first event
    is known.
  - L{IOnlineUsers}: who is online, told of each connection that opens
    and ends (C{--presence-events}; in memory, or across a cluster).
  - L{IConnectHook}: the app's say on whether a handshake may open.
  - L{IConnections}: C{send}, C{close} and C{list} as the API offers them,
    provided by the in-memory gateway and by the Redis cluster alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import attr
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from .connect import Verdict
    from .events import Event
    from .registry import Connection, Targets


class IChannel(Interface):
    """
    One client connection's outgoing side.
    """

    def deliver(frame: object) -> None:
        """
        Send a frame prepared once for any number of recipients (see
        L{wsgw.websocket.prepare_frame}); a channel that is closing drops it.
        """

    def ping() -> None:
        """Send a WebSocket ping frame; the client's pong is a sign of life."""

    def close_with(code: int, reason: str) -> None:
        """
        Start a closing handshake with C{code} (1001 and 4000-4999 allowed).
        """

    def pause_reading() -> None:
        """Stop reading from the client until L{resume_reading}."""

    def resume_reading() -> None:
        """Read from the client again."""


class IEventSink(Interface):
    """
    The app, as the forwarder sees it.
    """

    def post(event: Event) -> Deferred[Optional[bytes]]:
        """
        One attempt at delivering C{event}, alone in a request.

        @return: a L{Deferred} that fires when the app accepted it, with
            the body the app asked to send back to the event's connection
            (a 2xx answer with C{X-Wsgw-Reply: 1}) or L{None}; or fails
            with L{wsgw.forwarder.AppRejected} when retrying cannot help
            (the event is given up) or any other error when it may.
        """

    def post_batch(events: Sequence[Event]) -> Deferred[None]:
        """
        One attempt at delivering C{events} together, in one request;
        fires or fails as L{post} does (an answer's body is ignored).
        """


class IReadThrottle(Interface):
    """
    The forwarder's word on a connection whose events pile up.
    """

    def backlog_full(conn_id: str) -> None:
        """The backlog of C{conn_id} reached its bound: stop reading it."""

    def backlog_eased(conn_id: str) -> None:
        """The backlog of C{conn_id} fell back: read it again."""


class IReplies(Interface):
    """
    What the app answers to an event, for the event's connection.
    """

    def reply(event: Event, body: bytes) -> None:
        """
        Send C{body} to the connection of C{event} as one text frame, if it
        is still open, C{body} is UTF-8 and not over the message limit; a
        reply to a C{close} event goes nowhere.
        """


class IEventQueue(Interface):
    """
    Events on their way to the app, in order within each stream (a
    connection's, by its conn id).
    """

    def enqueue(event: Event) -> None:
        """Queue C{event} behind the earlier events of its stream."""

    def hold(stream: str) -> bool:
        """
        Start the new stream C{stream} held: what is queued in it waits
        until L{release}.  False (nothing held) if the stream has events
        already or nothing is forwarded.
        """

    def release(stream: str, first: Optional[Event]) -> None:
        """
        Let a held stream go, with C{first} (if any) ahead of everything
        queued in it meanwhile.
        """


class IOnlineUsers(Interface):
    """
    Per user name, whether it has a non-public connection: C{online} and
    C{offline} events for the app, with a grace period before C{offline}.
    """

    went_online = Attribute("C{online} events posted by this process so far.")
    went_offline = Attribute("C{offline} events posted by this process so far.")

    def __len__() -> int:
        """Users this process holds online (those in their grace period included)."""

    def opened(conn: Connection) -> None:
        """C{conn} opened; called before its C{open} event is queued."""

    def ended(conn: Connection) -> None:
        """C{conn} ended; called after its C{close} event is queued."""

    def shutting_down() -> None:
        """The gateway is closing every connection to stop."""


class IConnectHook(Interface):
    """
    Asks the app whether a handshake may become a connection.
    """

    counts = Attribute("Decisions so far, by result (admitted, refused, timeout, app_error, unreachable).")
    asking = Attribute("How many handshakes the app is being asked about now.")

    def admit(conn: Connection) -> Deferred[Verdict]:
        """
        The app's verdict on C{conn}, which never fails: an app that
        cannot decide gives a 503 verdict.  Cancelling it (the client hung
        up) abandons the question.
        """


class IMembership(Interface):
    """
    Told of every connection that joins or leaves the registry.
    """

    def joined(conn: Connection) -> None:
        """C{conn} is in the registry: send, close and list see it."""

    def left(conn: Connection) -> None:
        """C{conn} left the registry (it is closing or closed)."""


class IConnections(Interface):
    """
    The app's C{send}, C{close} and C{list}.  Every answer is a
    L{Deferred}, whether it is known at once (one process) or after the
    other nodes answered (a cluster).
    """

    up = Attribute("False while some nodes cannot be reached (a cluster whose Redis is down).")

    def send(payload: bytes, targets: Targets, binary: bool = False) -> Deferred[Reach]:
        """
        Send C{payload} to every matching connection as one text frame (it
        must be UTF-8), or with C{binary} as one binary frame.
        """

    def close(targets: Targets) -> Deferred[Reach]:
        """
        Close every matching connection with 4000; each produces a C{close}
        event on the node that held it.
        """

    def listing() -> Deferred[Listing]:
        """Every open connection, grouped by user as C{/list} shows them."""


class IConnectionsHere(IConnections):
    """
    Connections all held by this process, so that what C{send} would
    answer is known when it is asked: the push API calls C{send_here} and
    answers at once, without a L{Deferred} per call.
    """

    def send_here(
        payload: bytes,
        targets: Targets,
        binary: bool = False,
        first: Optional[IAnswerFirst] = None,
    ) -> int:
        """
        What C{send} does, returning how many connections it matched
        (C{send}'s C{Reach}, never partial).  With C{first}, the request
        asking, a fan-out may wait until it is answered.
        """


class IAnswerFirst(Interface):
    """
    A request whose answer may go out before work that cannot change it.
    A C{/send} knows whom it reaches once it has chosen them: the app has
    its answer before the frames are written, in the same turn of the
    reactor, and a fan-out to many does not keep it waiting.
    """

    def after_answer(work: Callable[[], None]) -> None:
        """Do C{work} right after the answer is written (or, the caller gone, would have been)."""


# The answers of IConnections, shared by both providers.


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Reach:
    """What a C{send} or C{close} reached."""

    matched: int
    #: Some node may not have been asked, or did not answer in time (Redis
    #: down, a node slow or dying): C{matched} may be short.
    partial: bool = False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Listing:
    """The C{/list} entries, and whether some node's are missing."""

    entries: List[Dict[str, Any]]
    partial: bool = False
