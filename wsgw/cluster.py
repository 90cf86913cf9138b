"""
Several wsgw nodes as one gateway, through Redis.

Each node keeps its own connections (and forwards their events itself);
Redis carries what the nodes must share:

  - presence: the hash C{<prefix>:conns:<node>} maps each of a node's conn
    ids to what C{/list} shows of it, and C{<prefix>:alive:<node>} says the
    node is alive.  Both expire after C{presence_ttl} seconds unless the
    node refreshes them (every third of that), so a node that dies leaves
    C{/list} within C{presence_ttl}; the set C{<prefix>:nodes} names the
    nodes to look at.  A node starting under a node id wipes that id's
    hash first, so a restart leaves no ghosts.
  - commands: an API C{send} or C{close} is applied to the node's own
    connections at once and published on C{<prefix>:commands}; every other
    node applies it to its connections and answers on
    C{<prefix>:replies:<origin>} how many matched.  Redis tells the
    publisher how many nodes received the command, so the origin knows how
    many answers to wait for (at most C{reply_timeout} seconds).

Every connection lives on exactly one node and each node receives each
command once, so a message reaches each matching connection exactly once.

Wire format (JSON, version 1)::

  command: {"v":1,"from":NODE,"id":REQUEST,"op":"send"|"close",
            "conn_ids":[...],"users":[...],"tokens":[...],"access":0|1|2,
            "payload":"<the frame's JSON text>"}      (payload: send only)
  reply:   {"v":1,"from":NODE,"id":REQUEST,"matched":N}
  presence record: {"name":USER,"public":BOOL,"conn":{... as /list shows it}}

Nothing read from Redis is trusted: a message or record that does not have
exactly these shapes is counted, logged (at most once a minute) and skipped.
"""

from __future__ import annotations

import itertools
import socket
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .config import Config, RedisAddress
from .events import decode_json, to_json
from .gateway import Gateway
from .redislink import RedisLink
from .registry import AccessType, Connection, group_listing

log = Logger()

PROTOCOL_VERSION = 1
_MAX_NAME = 256
_DESCRIBED_FIELDS = ("id", "token", "userAgent", "userAgentTag", "remoteAddr")
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


class Malformed(ValueError):
    """A message or record from Redis that does not have the expected shape."""


@attr.s(frozen=True, slots=True)
class Reach:
    """What a cluster-wide C{send} or C{close} reached."""

    matched: int = attr.ib()
    #: Some node may not have been asked or did not answer in time (Redis
    #: down, a node slow or dying): C{matched} may be short.
    partial: bool = attr.ib(default=False)


@attr.s(frozen=True, slots=True)
class Command:
    origin: str = attr.ib()
    request_id: str = attr.ib()
    op: str = attr.ib()
    conn_ids: Sequence[str] = attr.ib()
    users: Sequence[str] = attr.ib()
    tokens: Sequence[str] = attr.ib()
    access: AccessType = attr.ib()
    payload: Optional[bytes] = attr.ib(default=None)


@attr.s(slots=True)
class ClusterStats:
    published: int = attr.ib(default=0)
    applied: int = attr.ib(default=0)
    malformed: int = attr.ib(default=0)
    partial: int = attr.ib(default=0)
    #: Live nodes seen at the last refresh, this one included.
    nodes: int = attr.ib(default=0)


def encode_command(
    origin: str, request_id: str, op: str, conn_ids, users, tokens, access: AccessType, payload: Optional[bytes] = None
) -> bytes:
    message: Dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "from": origin,
        "id": request_id,
        "op": op,
        "conn_ids": list(conn_ids),
        "users": list(users),
        "tokens": list(tokens),
        "access": int(access),
    }
    if payload is not None:
        message["payload"] = payload.decode("utf-8")
    return to_json(message)


def encode_reply(origin: str, request_id: str, matched: int) -> bytes:
    return to_json({"v": PROTOCOL_VERSION, "from": origin, "id": request_id, "matched": matched})


def _json_object(raw) -> Dict[str, Any]:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("not UTF-8") from None
    if not isinstance(raw, str):
        raise Malformed("not text")
    try:
        value = decode_json(raw)
    except (ValueError, RecursionError):
        raise Malformed("not JSON") from None
    if not isinstance(value, dict):
        raise Malformed("not a JSON object")
    return value


def _name(message: Dict[str, Any], field: str) -> str:
    value = message.get(field)
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_NAME:
        raise Malformed(f"{field} must be a string of 1 to {_MAX_NAME} characters")
    return value


def _strings(message: Dict[str, Any], field: str) -> List[str]:
    value = message.get(field, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Malformed(f"{field} must be a list of strings")
    return value


def _envelope(raw) -> Dict[str, Any]:
    message = _json_object(raw)
    if message.get("v") != PROTOCOL_VERSION:
        raise Malformed(f"unknown version {message.get('v')!r}")
    return message


def parse_command(raw) -> Command:
    message = _envelope(raw)
    op = message.get("op")
    if op not in ("send", "close"):
        raise Malformed(f"unknown op {op!r}")
    access = message.get("access", 0)
    if isinstance(access, bool) or access not in (0, 1, 2):
        raise Malformed("access must be 0, 1 or 2")
    conn_ids, users, tokens = (_strings(message, f) for f in ("conn_ids", "users", "tokens"))
    if not (conn_ids or users or tokens):
        raise Malformed("no target")
    payload = None
    if op == "send":
        text = message.get("payload")
        if not isinstance(text, str):
            raise Malformed("payload must be a string")
        try:
            decode_json(text)
            payload = text.encode("utf-8")
        except (ValueError, RecursionError, UnicodeEncodeError):
            raise Malformed("payload is not JSON text") from None
    return Command(
        _name(message, "from"), _name(message, "id"), op, conn_ids, users, tokens, AccessType(access), payload
    )


def parse_reply(raw) -> Tuple[str, str, int]:
    message = _envelope(raw)
    matched = message.get("matched")
    if isinstance(matched, bool) or not isinstance(matched, int) or matched < 0:
        raise Malformed("matched must be a count")
    return _name(message, "from"), _name(message, "id"), matched


def presence_record(conn: Connection) -> bytes:
    return to_json({"name": conn.user_name, "public": conn.access_public, "conn": conn.describe()})


def parse_presence(raw) -> Tuple[str, bool, Dict[str, str]]:
    record = _json_object(raw)
    name, public, described = record.get("name"), record.get("public"), record.get("conn")
    if not isinstance(name, str) or not isinstance(public, bool) or not isinstance(described, dict):
        raise Malformed("a presence record needs name, public and conn")
    if not all(isinstance(described.get(field), str) for field in _DESCRIBED_FIELDS):
        raise Malformed("a presence record's conn needs " + ", ".join(_DESCRIBED_FIELDS))
    return name, public, {field: described[field] for field in _DESCRIBED_FIELDS}


@attr.s(eq=False, slots=True)
class _Pending:
    """A command this node published, waiting for the other nodes' counts."""

    local: int = attr.ib()
    done: Deferred = attr.ib(factory=Deferred)
    matched: int = attr.ib(default=0)
    answered: int = attr.ib(default=0)
    #: How many nodes received it (Redis says, when the publish returns).
    expected: Optional[int] = attr.ib(default=None)
    timer: Any = attr.ib(default=None)


def default_node_id(config: Config) -> str:
    """The host name and the first listen endpoint: unique per host and port, stable across restarts."""
    where = config.listen[0] if config.listen else (config.admin_listen or ("embedded",))[0]
    return "".join(c if "!" <= c <= "~" else "_" for c in f"{socket.gethostname()}/{where}")[:200]


def make_cluster(gateway: Gateway, config: Config, clock) -> Cluster:
    return Cluster(
        gateway,
        config.redis_address(),
        config.node_id or default_node_id(config),
        clock,
        prefix=config.redis_prefix,
        presence_ttl=config.presence_ttl,
        reply_timeout=config.cluster_timeout,
    )


@attr.s(eq=False)
class Cluster(Service):
    """
    This node's part in a cluster: it mirrors the gateway's connections into
    Redis, and it runs API commands on every node.
    """

    gateway: Gateway = attr.ib()
    address: RedisAddress = attr.ib()
    node_id: str = attr.ib()
    clock = attr.ib()
    prefix: str = attr.ib(default="wsgw")
    presence_ttl: float = attr.ib(default=15.0)
    #: How long a command waits for the other nodes' answers.
    reply_timeout: float = attr.ib(default=2.0)
    stats: ClusterStats = attr.ib(factory=ClusterStats)

    link: RedisLink = attr.ib(init=False)
    #: Tells this process from an earlier one under the same node id.
    instance: str = attr.ib(factory=lambda: uuid.uuid4().hex, init=False)
    _pending: Dict[str, _Pending] = attr.ib(factory=dict, init=False)
    _requests = attr.ib(factory=itertools.count, init=False)
    #: The whole hash must be written again (first connection, a failed
    #: write, Redis lost it).
    _resync: bool = attr.ib(default=True, init=False)
    _refresh: Optional[LoopingCall] = attr.ib(default=None, init=False)
    _refreshes: int = attr.ib(default=0, init=False)
    _conflict_logged: bool = attr.ib(default=False, init=False)
    _malformed_logged_at: Optional[float] = attr.ib(default=None, init=False)
    _malformed_unlogged: int = attr.ib(default=0, init=False)

    def __attrs_post_init__(self):
        self.nodes_key = f"{self.prefix}:nodes"
        self.alive_prefix = f"{self.prefix}:alive:"
        self.conns_prefix = f"{self.prefix}:conns:"
        self.commands_channel = f"{self.prefix}:commands"
        self.reply_channel = self.reply_channel_of(self.node_id)
        self.conns_key = self.conns_prefix + self.node_id
        self.alive_key = self.alive_prefix + self.node_id
        self.link = RedisLink(
            self.address,
            [self.commands_channel, self.reply_channel],
            self._message,
            self._state,
            self.clock,
            reply_timeout=max(self.reply_timeout, 1.0) * 2,
        )
        self.gateway.cluster = self

    def reply_channel_of(self, node_id: str) -> str:
        return f"{self.prefix}:replies:{node_id}"

    @property
    def up(self) -> bool:
        return self.link.up

    @property
    def _ttl_ms(self) -> int:
        return int(self.presence_ttl * 1000)

    # -- service ---------------------------------------------------------

    def startService(self):
        super().startService()
        self.link.startService()
        self._refresh = LoopingCall(self._tick)
        self._refresh.clock = self.clock
        self._refresh.start(self.presence_ttl / 3, now=False)

    def stopService(self):
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
        d = succeed(None)
        if self.link.up:
            d = self.link.command("DEL", self.conns_key, self.alive_key)
            d.addCallback(lambda _: self.link.command("SREM", self.nodes_key, self.node_id))
            d.addErrback(lambda f: log.warn("could not leave the cluster cleanly: {error}", error=f.getErrorMessage()))
        return d.addBoth(lambda _: self.link.stopService())

    # -- presence --------------------------------------------------------

    def joined(self, conn: Connection) -> None:
        if self.link.up and not self._resync:
            self.link.command("HSET", self.conns_key, conn.conn_id, presence_record(conn)).addErrback(
                self._write_failed
            )
        else:
            self._resync = True

    def left(self, conn: Connection) -> None:
        if self.link.up and not self._resync:
            self.link.command("HDEL", self.conns_key, conn.conn_id).addErrback(self._write_failed)
        else:
            self._resync = True

    def _write_failed(self, failure) -> None:
        # Redis went away mid-write; the link logs that once, and the
        # whole hash is written again when it is back.
        self._resync = True

    def _state(self, up: bool) -> None:
        if up:
            self._write_all()
        else:
            self._resync = True

    def _write_all(self) -> None:
        """
        Write this node's hash from scratch: everything it holds now, and
        nothing an earlier process under the same node id left behind.
        Commands on one connection run in order, so a later C{HSET} or
        C{HDEL} lands after these.
        """
        self._resync = False
        link, key = self.link, self.conns_key
        writes = [link.command("DEL", key)]
        fields: List[Any] = []
        for conn in self.gateway.registry:
            fields += [conn.conn_id, presence_record(conn)]
            if len(fields) >= 1000:
                writes.append(link.command("HSET", key, *fields))
                fields = []
        if fields:
            writes.append(link.command("HSET", key, *fields))
        writes.append(self._mark_alive())
        for d in writes:
            d.addErrback(self._write_failed)

    def _mark_alive(self) -> Deferred:
        keys = [self.nodes_key, self.alive_key, self.conns_key]
        d = self.link.eval(_REFRESH, keys, [self.node_id, self.instance, self._ttl_ms, self.alive_prefix])
        return d.addCallback(self._refreshed)

    def _tick(self) -> None:
        if not self.link.up:
            return
        if self._resync:
            self._write_all()
        else:
            self._mark_alive().addErrback(self._write_failed)

    def _refreshed(self, result) -> None:
        previous, kept, live = result
        self.stats.nodes = int(live)
        # A restart under the same id finds its predecessor once, at the
        # first refresh; a second live process under this id keeps showing.
        if previous not in ("", self.instance) and self._refreshes and not self._conflict_logged:
            log.error("another process uses node id {node_id}; give every node its own --node-id", node_id=self.node_id)
            self._conflict_logged = True
        self._refreshes += 1
        if not int(kept) and len(self.gateway.registry):
            log.info("redis lost this node's presence (restarted or flushed?); writing it again")
            self._write_all()

    # -- the API, cluster-wide --------------------------------------------

    def send(self, payload: bytes, conn_ids=(), users=(), tokens=(), access=AccessType.ALL) -> Deferred:
        only_here = self._only_here(conn_ids, users, tokens)
        local = self.gateway.send(payload, conn_ids, users, tokens, access)
        if only_here:
            return succeed(Reach(local))
        return self._everywhere("send", local, conn_ids, users, tokens, access, payload)

    def close(self, conn_ids=(), users=(), tokens=(), access=AccessType.ALL) -> Deferred:
        # Asked before closing: the closed connections leave the registry.
        only_here = self._only_here(conn_ids, users, tokens)
        local = self.gateway.close(conn_ids, users, tokens, access)
        if only_here:
            return succeed(Reach(local))
        return self._everywhere("close", local, conn_ids, users, tokens, access, None)

    def _only_here(self, conn_ids, users, tokens) -> bool:
        """
        Conn ids are unique across nodes: when the targets are conn ids
        alone and this node holds every one, no other node can match.
        """
        registry = self.gateway.registry
        return bool(conn_ids) and not users and not tokens and all(registry.get(c) is not None for c in conn_ids)

    def _everywhere(self, op, local, conn_ids, users, tokens, access, payload) -> Deferred:
        if not self.link.up:
            return succeed(Reach(local, partial=True))
        request_id = f"{self.instance[:8]}-{next(self._requests)}"
        pending = _Pending(local)
        self._pending[request_id] = pending
        pending.timer = self.clock.callLater(self.reply_timeout, self._timed_out, request_id)
        message = encode_command(self.node_id, request_id, op, conn_ids, users, tokens, access, payload)
        self.stats.published += 1
        d = self.link.command("PUBLISH", self.commands_channel, message)
        d.addCallbacks(self._received_by, self._not_published, callbackArgs=(request_id,), errbackArgs=(request_id,))
        return pending.done

    def _received_by(self, receivers, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is not None:
            pending.expected = int(receivers)
            self._check(request_id, pending)

    def _not_published(self, failure, request_id: str) -> None:
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

    def _message(self, channel, raw) -> None:
        try:
            if channel == self.commands_channel:
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
            matched = self.gateway.send(
                command.payload, command.conn_ids, command.users, command.tokens, command.access
            )
        else:
            matched = self.gateway.close(command.conn_ids, command.users, command.tokens, command.access)
        self.stats.applied += 1
        reply = encode_reply(self.node_id, command.request_id, matched)
        self.link.command("PUBLISH", self.reply_channel_of(command.origin), reply).addErrback(lambda _: None)

    def _reply(self, origin: str, request_id: str, matched: int) -> None:
        pending = self._pending.get(request_id)
        if pending is None:
            return  # too late: that answer was given already
        pending.matched += matched
        pending.answered += 1
        self._check(request_id, pending)

    def _malformed(self, channel, reason: str) -> None:
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

    # -- list ----------------------------------------------------------------

    def listing(self) -> Deferred:
        """
        C{(entries, partial)}: every live node's connections, grouped by
        user as C{/list} shows them; this node's come from its own registry.
        """
        mine = [(c.user_name, c.access_public, c.describe()) for c in self.gateway.registry]
        if not self.link.up:
            return succeed((group_listing(mine), True))
        d = self.link.eval(_LIST, [self.nodes_key], [self.alive_prefix, self.conns_prefix])

        def merge(result):
            found = list(mine)
            for node, records in zip(result[::2], result[1::2]):
                if node == self.node_id:
                    continue
                for raw in records:
                    try:
                        found.append(parse_presence(raw))
                    except Malformed as e:
                        self._malformed(self.conns_prefix + str(node), str(e))
            return group_listing(found), False

        def local_only(failure):
            return group_listing(mine), True

        return d.addCallbacks(merge, local_only)
