"""
This node's part in a cluster of wsgw nodes that act as one gateway.

Each node keeps its own connections (and forwards their events itself);
Redis carries what the nodes must share (see L{wsgw.cluster.wire}):

  - presence (L{Presence}): each node mirrors its registry into a hash
    that expires unless refreshed every third of the presence TTL, so a
    node that dies leaves C{/list} within that TTL.  A node starting under
    a node id wipes that id's hash first, so a restart leaves no ghosts.
  - commands (L{Cluster}): an API C{send} or C{close} is applied to the
    node's own connections at once and published; every other node applies
    it to its connections and answers the origin how many matched.  Redis
    tells the publisher how many nodes received the command, so the origin
    knows how many answers to wait for (at most C{reply_timeout} seconds).

Every connection lives on exactly one node and each node receives each
command once, so a message reaches each matching connection exactly once.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any, Dict, Iterator, List, Optional

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import RedisAddress
from ..gateway import Gateway
from ..interfaces import IConnections, IMembership, Listing, Reach
from ..registry import Connection, Registry, Targets, group_listing
from .redislink import RedisLink
from .wire import (
    Command,
    Keys,
    Malformed,
    encode_command,
    encode_reply,
    parse_command,
    parse_presence,
    parse_reply,
    presence_record,
)

log = Logger()

#: How often a flood of malformed messages is logged, at most.
_MALFORMED_LOG_INTERVAL = 60.0

# Every tick: mark this node alive, keep its hash, drop dead nodes from the
# set.  Returns the instance that held the node id before, whether the hash
# still existed (Redis restarted or flushed if not), and the live nodes.
_REFRESH = """
redis.call('SADD', KEYS[1], ARGV[1])
local previous = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local kept = redis.call('PEXPIRE', KEYS[3], ARGV[3])
local live = 0
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[4] .. node) == 1 then
    live = live + 1
  else
    redis.call('SREM', KEYS[1], node)
  end
end
return {previous or '', kept, live}
"""

# The presence records of every live node: node, records, node, records...
_LIST = """
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. node) == 1 then
    out[#out + 1] = node
    out[#out + 1] = redis.call('HVALS', ARGV[2] .. node)
  end
end
return out
"""


@attr.s(slots=True)
class ClusterStats:
    published: int = attr.ib(default=0)
    applied: int = attr.ib(default=0)
    malformed: int = attr.ib(default=0)
    partial: int = attr.ib(default=0)
    #: Live nodes seen at the last refresh, this one included.
    nodes: int = attr.ib(default=0)


@implementer(IMembership)
@attr.s(eq=False)
class Presence:
    """
    This node's connections as the other nodes see them: its registry,
    mirrored into Redis while the link is up and written again whole when
    it comes back.  The registry tells it of every join and leave.
    """

    registry: Registry = attr.ib()
    node_id: str = attr.ib()
    keys: Keys = attr.ib(factory=Keys)
    presence_ttl: float = attr.ib(default=15.0)
    stats: ClusterStats = attr.ib(factory=ClusterStats)
    #: Tells this process from an earlier one under the same node id.
    instance: str = attr.ib(factory=lambda: uuid.uuid4().hex)

    #: The link while it is up.
    _link: Optional[Any] = attr.ib(default=None, init=False)
    #: The whole hash must be written again (first connection, a failed
    #: write, Redis lost it).
    _resync: bool = attr.ib(default=True, init=False)
    _refreshes: int = attr.ib(default=0, init=False)
    _conflict_logged: bool = attr.ib(default=False, init=False)

    @property
    def conns_key(self) -> str:
        return self.keys.conns(self.node_id)

    @property
    def alive_key(self) -> str:
        return self.keys.alive(self.node_id)

    # -- IMembership ---------------------------------------------------------

    def joined(self, conn: Connection) -> None:
        if self._link is not None and not self._resync:
            link, key = self._link, self.conns_key
            link.command("HSET", key, conn.conn_id, presence_record(conn)).addErrback(self._write_failed)
            # The hash may have just been created (its last field had gone,
            # and Redis deleted it): it must expire even if this node dies
            # before its next refresh.
            link.command("PEXPIRE", key, int(self.presence_ttl * 1000)).addErrback(self._write_failed)
        else:
            self._resync = True

    def left(self, conn: Connection) -> None:
        if self._link is not None and not self._resync:
            self._link.command("HDEL", self.conns_key, conn.conn_id).addErrback(self._write_failed)
        else:
            self._resync = True

    # -- the link's state ------------------------------------------------------

    def connected(self, link: Any) -> None:
        """Redis is reachable through C{link}: write everything again."""
        self._link = link
        self._write_all()

    def disconnected(self) -> None:
        self._link = None
        self._resync = True

    def refresh(self) -> None:
        """Every third of the TTL: say this node is alive (and catch up)."""
        if self._link is None:
            return
        if self._resync:
            self._write_all()
        else:
            self._mark_alive().addErrback(self._write_failed)

    def leave(self) -> Deferred[Any]:
        """Leave at once, rather than when the presence expires."""
        link = self._link
        if link is None:
            return succeed(None)
        d: Deferred[Any] = link.command("DEL", self.conns_key, self.alive_key)
        d.addCallback(lambda _: link.command("SREM", self.keys.nodes, self.node_id))
        return d

    def _write_failed(self, failure: Failure) -> None:
        # Redis went away mid-write; the link logs that once, and the
        # whole hash is written again when it is back.
        self._resync = True

    def _write_all(self) -> None:
        """
        Write this node's hash from scratch: everything it holds now, and
        nothing an earlier process under the same node id left behind.
        Commands on one connection run in order, so a later C{HSET} or
        C{HDEL} lands after these.
        """
        link = self._link
        if link is None:
            return
        self._resync = False
        key = self.conns_key
        writes = [link.command("DEL", key)]
        fields: List[Any] = []
        for conn in self.registry:
            fields += [conn.conn_id, presence_record(conn)]
            if len(fields) >= 1000:
                writes.append(link.command("HSET", key, *fields))
                fields = []
        if fields:
            writes.append(link.command("HSET", key, *fields))
        writes.append(self._mark_alive())
        for d in writes:
            d.addErrback(self._write_failed)

    def _mark_alive(self) -> Deferred[None]:
        assert self._link is not None
        keys = [self.keys.nodes, self.alive_key, self.conns_key]
        ttl_ms = int(self.presence_ttl * 1000)
        d: Deferred[List[Any]] = self._link.eval(
            _REFRESH, keys, [self.node_id, self.instance, ttl_ms, self.keys.alive_prefix]
        )
        return d.addCallback(self._refreshed)

    def _refreshed(self, result: List[Any]) -> None:
        previous, kept, live = result
        self.stats.nodes = int(live)
        # A restart under the same id finds its predecessor once, at the
        # first refresh; a second live process under this id keeps showing.
        if previous not in ("", self.instance) and self._refreshes and not self._conflict_logged:
            log.error("another process uses node id {node_id}; give every node its own --node-id", node_id=self.node_id)
            self._conflict_logged = True
        self._refreshes += 1
        if not int(kept) and len(self.registry):
            log.info("redis lost this node's presence (restarted or flushed?); writing it again")
            self._write_all()


@attr.s(eq=False, slots=True)
class _Pending:
    """A command this node published, waiting for the other nodes' counts."""

    local: int = attr.ib()
    done: Deferred[Reach] = attr.ib(factory=Deferred)
    matched: int = attr.ib(default=0)
    answered: int = attr.ib(default=0)
    #: How many nodes received it (Redis says, when the publish returns).
    expected: Optional[int] = attr.ib(default=None)
    timer: Any = attr.ib(default=None)


@implementer(IConnections)
@attr.s(eq=False)
class Cluster(Service):
    """
    The API's C{send}, C{close} and C{list} across every node, and the
    service that keeps this node's link to Redis and its presence fresh.
    """

    gateway: Gateway = attr.ib()
    presence: Presence = attr.ib()
    address: RedisAddress = attr.ib()
    clock: IReactorTime = attr.ib()
    #: How long a command waits for the other nodes' answers.
    reply_timeout: float = attr.ib(default=2.0)
    #: The connection to Redis; by default a L{RedisLink} to C{address}.
    link: Any = attr.ib(default=None)
    #: Presence events across the cluster (a L{wsgw.cluster.online.ClusterOnline}),
    #: with C{--presence-events}.
    online: Any = attr.ib(default=None)

    _pending: Dict[str, _Pending] = attr.ib(factory=dict, init=False)
    _requests: Iterator[int] = attr.ib(factory=itertools.count, init=False)
    _refresh: Optional[LoopingCall] = attr.ib(default=None, init=False)
    _malformed_logged_at: Optional[float] = attr.ib(default=None, init=False)
    _malformed_unlogged: int = attr.ib(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.link is None:
            keys = self.presence.keys
            self.link = RedisLink(
                self.address,
                [keys.commands, self.reply_channel],
                self._message,
                self._state,
                self.clock,
                reply_timeout=max(self.reply_timeout, 1.0) * 2,
            )

    @property
    def node_id(self) -> str:
        return self.presence.node_id

    @property
    def keys(self) -> Keys:
        return self.presence.keys

    @property
    def reply_channel(self) -> str:
        return self.presence.keys.replies(self.node_id)

    @property
    def stats(self) -> ClusterStats:
        return self.presence.stats

    @property
    def up(self) -> bool:
        return bool(self.link.up)

    # -- service ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.link.startService()
        self._refresh = LoopingCall(self.presence.refresh)
        self._refresh.clock = self.clock
        self._refresh.start(self.presence.presence_ttl / 3, now=False)
        if self.online is not None:
            self.online.start()

    def stopService(self) -> Deferred[None]:
        """
        Leave the cluster at once rather than when this node's presence
        expires.  The gateway stops first and has already taken its clients
        out of the registry (their C{HDEL}s are queued ahead of this).
        """
        super().stopService()
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        for request_id in list(self._pending):
            self._finish(request_id, partial=True)
        d = self.online.leave() if self.online is not None else succeed(None)
        d.addErrback(
            lambda f: log.warn("could not hand this node's users to the others: {error}", error=f.getErrorMessage())
        )
        d.addCallback(lambda _: self.presence.leave())
        d.addErrback(lambda f: log.warn("could not leave the cluster cleanly: {error}", error=f.getErrorMessage()))
        return d.addBoth(lambda _: self.link.stopService())

    def _state(self, up: bool) -> None:
        if up:
            self.presence.connected(self.link)
            if self.online is not None:
                self.online.connected(self.link)
        else:
            self.presence.disconnected()
            if self.online is not None:
                self.online.disconnected()

    # -- IConnections --------------------------------------------------------

    def send(self, payload: bytes, targets: Targets, binary: bool = False) -> Deferred[Reach]:
        only_here = self._only_here(targets)
        local = self.gateway.send_here(payload, targets, binary)
        if only_here:
            return succeed(Reach(local))
        return self._everywhere(Command(self.node_id, self._request_id(), "send", targets, payload, binary), local)

    def close(self, targets: Targets) -> Deferred[Reach]:
        # Asked before closing: the closed connections leave the registry.
        only_here = self._only_here(targets)
        local = self.gateway.close_here(targets)
        if only_here:
            return succeed(Reach(local))
        return self._everywhere(Command(self.node_id, self._request_id(), "close", targets), local)

    def listing(self) -> Deferred[Listing]:
        """
        Every live node's connections, grouped by user as C{/list} shows
        them; this node's come from its own registry.
        """
        mine = [(c.user_name, c.access_public, c.describe()) for c in self.gateway.registry]
        if not self.link.up:
            return succeed(Listing(group_listing(mine), partial=True))
        keys = self.keys
        d = self.link.eval(_LIST, [keys.nodes], [keys.alive_prefix, keys.conns_prefix])

        def merge(result: List[Any]) -> Listing:
            found = list(mine)
            for node, records in zip(result[::2], result[1::2]):
                if node == self.node_id:
                    continue
                for raw in records:
                    try:
                        found.append(parse_presence(raw))
                    except Malformed as e:
                        self._malformed(keys.conns(str(node)), str(e))
            return Listing(group_listing(found))

        def local_only(failure: Failure) -> Listing:
            return Listing(group_listing(mine), partial=True)

        result: Deferred[Listing] = d.addCallbacks(merge, local_only)
        return result

    def _only_here(self, targets: Targets) -> bool:
        """
        Conn ids are unique across nodes: when the targets are conn ids
        alone and this node holds every one, no other node can match.
        """
        registry = self.gateway.registry
        return targets.only_conn_ids() and all(registry.get(c) is not None for c in targets.conn_ids)

    def _request_id(self) -> str:
        return f"{self.presence.instance[:8]}-{next(self._requests)}"

    def _everywhere(self, command: Command, local: int) -> Deferred[Reach]:
        if not self.link.up:
            return succeed(Reach(local, partial=True))
        request_id = command.request_id
        pending = _Pending(local)
        self._pending[request_id] = pending
        pending.timer = self.clock.callLater(self.reply_timeout, self._timed_out, request_id)
        message = encode_command(command)
        self.stats.published += 1
        d = self.link.command("PUBLISH", self.keys.commands, message)
        d.addCallbacks(self._received_by, self._not_published, callbackArgs=(request_id,), errbackArgs=(request_id,))
        return pending.done

    def _received_by(self, receivers: Any, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is not None:
            pending.expected = int(receivers)
            self._check(request_id, pending)

    def _not_published(self, failure: Failure, request_id: str) -> None:
        self._finish(request_id, partial=True)

    def _timed_out(self, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is None:
            return
        log.info(
            "cluster: {missing} node(s) did not answer {request_id} within {timeout}s; its count is partial",
            missing=(pending.expected or 0) - pending.answered if pending.expected is not None else "some",
            request_id=request_id,
            timeout=self.reply_timeout,
        )
        pending.timer = None
        self._finish(request_id, partial=True)

    def _check(self, request_id: str, pending: _Pending) -> None:
        if pending.expected is not None and pending.answered >= pending.expected:
            self._finish(request_id, partial=False)

    def _finish(self, request_id: str, partial: bool) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        if partial:
            self.stats.partial += 1
        pending.done.callback(Reach(pending.local + pending.matched, partial))

    # -- what arrives from Redis -------------------------------------------

    def _message(self, channel: str, raw: object) -> None:
        try:
            if channel == self.keys.commands:
                self._command(parse_command(raw))
            elif channel == self.reply_channel:
                self._reply(*parse_reply(raw))
        except Malformed as e:
            self._malformed(channel, str(e))
        except Exception:
            log.failure("could not handle a message from redis on {channel}", channel=channel)

    def _command(self, command: Command) -> None:
        if command.origin == self.node_id:
            pending = self._pending.get(command.request_id)
            if pending is not None:  # our own, already applied here
                pending.answered += 1
                self._check(command.request_id, pending)
            return
        if command.op == "send":
            assert command.payload is not None
            matched = self.gateway.send_here(command.payload, command.targets, command.binary)
        else:
            matched = self.gateway.close_here(command.targets)
        self.stats.applied += 1
        reply = encode_reply(self.node_id, command.request_id, matched)
        self.link.command("PUBLISH", self.keys.replies(command.origin), reply).addErrback(lambda _: None)

    def _reply(self, origin: str, request_id: str, matched: int) -> None:
        pending = self._pending.get(request_id)
        if pending is None:
            return  # too late: that answer was given already
        pending.matched += matched
        pending.answered += 1
        self._check(request_id, pending)

    def _malformed(self, channel: str, reason: str) -> None:
        self.stats.malformed += 1
        now = self.clock.seconds()
        last = self._malformed_logged_at
        if last is not None and now - last < _MALFORMED_LOG_INTERVAL:
            self._malformed_unlogged += 1
            return
        log.warn(
            "skipped a malformed message on {channel}: {reason} ({unlogged} more skipped since the last report)",
            channel=channel,
            reason=reason,
            unlogged=self._malformed_unlogged,
        )
        self._malformed_logged_at = now
        self._malformed_unlogged = 0
