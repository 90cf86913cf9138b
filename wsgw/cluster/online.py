"""
Who is online across a cluster (C{--presence-events} on the Redis engine):
exactly one C{online} and one C{offline} per transition of a user, decided
in Redis and posted by one node.

Every decision is one Lua script, so the nodes never race:

  - a user's first connection on a node adds the node to the user's set;
    if the user was not online, the script makes it so, under a new
    number, and names this node as the one to post it.  The node holds
    that connection's events meanwhile, so the C{online} goes ahead of its
    C{open} (unless Redis takes longer than C{decide_timeout}; then it
    follows, late).
  - a user's last connection on a node ending takes the node out of the
    set; a user with no node left starts its grace period, owned by this
    node.  When it is over and nobody came back, the owner claims the
    C{offline} and posts it behind that connection's C{close}.
  - every node sweeps every second: it says it is alive, claims what is
    due, and, once it has itself been linked to Redis for a whole presence
    TTL, reaps nodes that have not swept for a TTL (they died: their users
    start a grace period that ends a TTL plus the grace after the dead
    node's last sweep).  A grace period whose owner is gone is claimed by
    whichever node sweeps first.
  - a node that could not say what happened (Redis down, a script that
    failed) says it all at once when it can: it hands Redis the full list
    of its users (L{_SYNC}), and Redis works out the difference.  Nothing is
    invented meanwhile: while Redis is down no node decides anything.

Each decision is numbered from one counter (the event id is
C{presence:<number>}), so the numbers of one user's events grow, whichever
node posts them.  A decision to post stays in Redis until its node says it
has queued the event (the next sweep carries that word), so a reply lost
with a Redis connection is found again rather than lost.

Keys, besides the engine's (see L{wsgw.cluster.wire}), all under the prefix:
C{online} (hash: user -> "<number> <instance>", the instance "-" once its
C{online} is queued), C{pu:<user>} (hash: nodes where the user has a
non-public connection), C{pn:<node>} (set: that node's users),
C{going} (sorted set: users in their grace period, by its end in ms),
C{goingby} (hash: user -> the instance that owns its grace period),
C{pseen} (hash: node -> "<ms of its last sweep> <instance>"),
C{off:<instance>} (hash: user -> the number of an C{offline} that instance
is to post), C{pseq} (the counter) and C{pmark} (when this presence state
was created: a node that sees it change knows Redis lost the state).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..events import Event
from ..interfaces import IEventQueue, IOnlineUsers
from ..online import PresenceEvents
from ..registry import Connection, Registry, Targets
from .redislink import LINK_ERRORS
from .wire import Keys

log = Logger()

#: How often a node sweeps, at most (it also sweeps when a grace period it
#: owns ends).
SWEEP_INTERVAL = 1.0

_PRELUDE = """
local p, node, inst = ARGV[1], ARGV[2], ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local online, going, goingby, pseen = p .. ':online', p .. ':going', p .. ':goingby', p .. ':pseen'
local function up(user, quiet)
  redis.call('HSET', p .. ':pu:' .. user, node, 1)
  redis.call('SADD', p .. ':pn:' .. node, user)
  if redis.call('ZREM', going, user) == 1 then redis.call('HDEL', goingby, user) end
  local rec = redis.call('HGET', online, user)
  if rec then return rec end
  local id = redis.call('INCR', p .. ':pseq')
  if quiet then rec = id .. ' -' else rec = id .. ' ' .. inst end
  redis.call('HSET', online, user, rec)
  return rec
end
local function down(user, from, deadline, owner)
  local pu = p .. ':pu:' .. user
  redis.call('HDEL', pu, from)
  redis.call('SREM', p .. ':pn:' .. from, user)
  if redis.call('EXISTS', pu) == 0 and redis.call('HEXISTS', online, user) == 1
      and not redis.call('ZSCORE', going, user) then
    redis.call('ZADD', going, deadline, user)
    redis.call('HSET', goingby, user, owner)
  end
end
local function ack(from)
  local n = tonumber(ARGV[from])
  for i = from + 1, from + 3 * n, 3 do
    local kind, user, id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if kind == 'online' then
      if redis.call('HGET', online, user) == id .. ' ' .. inst then
        redis.call('HSET', online, user, id .. ' -')
      end
    elseif redis.call('HGET', p .. ':off:' .. inst, user) == id then
      redis.call('HDEL', p .. ':off:' .. inst, user)
    end
  end
  return from + 1 + 3 * n
end
"""

# A node's users came or went: ARGV[4] the grace in ms, ARGV[5] how many
# came, then those, then those that went.  Returns user, record, ... of
# those that came.
_CHANGE = (
    _PRELUDE
    + """
local grace, n = tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}
for i = 6, 5 + n do
  out[#out + 1] = ARGV[i]
  out[#out + 1] = up(ARGV[i], false)
end
for i = 6 + n, #ARGV do down(ARGV[i], node, now + grace, inst) end
return out
"""
)

# A node says all its users at once: ARGV[4] the grace in ms, ARGV[5] the
# mark the node last saw ('' if none), ARGV[6] how many users, then those,
# then those of them the node knows to be online already.  Returns the
# mark, then user, record, ...
_SYNC = (
    _PRELUDE
    + """
local grace, seen_mark, n = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local want = {}
for i = 7, 6 + n do want[ARGV[i]] = true end
for _, user in ipairs(redis.call('SMEMBERS', p .. ':pn:' .. node)) do
  if not want[user] then down(user, node, now + grace, inst) end
end
local mark = redis.call('GET', p .. ':pmark')
if not mark then
  mark = tostring(now)
  redis.call('SET', p .. ':pmark', mark)
end
local known = {}
if seen_mark ~= '' and seen_mark ~= mark then
  for i = 7 + n, #ARGV do known[ARGV[i]] = true end
end
local out = {mark}
for i = 7, 6 + n do
  out[#out + 1] = ARGV[i]
  out[#out + 1] = up(ARGV[i], known[ARGV[i]] == true)
end
local before = redis.call('HGET', pseen, node)
if before then
  local earlier = string.sub(before, string.find(before, ' ', 1, true) + 1)
  if earlier ~= inst then redis.call('DEL', p .. ':off:' .. earlier) end
end
redis.call('HSET', pseen, node, now .. ' ' .. inst)
return out
"""
)

# Every second: ARGV[4] the TTL in ms, ARGV[5] the grace in ms, ARGV[6]
# '1' if this node may judge others dead, ARGV[7] the mark it last saw,
# then the events it has queued since (count, then kind, user, number).
# Returns 'lost' when the state is not the one the node knew, else the
# offline events this node is to post: user, number, ...
_SWEEP = (
    _PRELUDE
    + """
local ttl, grace, reap = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6] == '1'
ack(8)
if redis.call('GET', p .. ':pmark') ~= ARGV[7] then return {'lost'} end
redis.call('HSET', pseen, node, now .. ' ' .. inst)
local alive = {}
alive[inst] = true
local seen = redis.call('HGETALL', pseen)
for i = 1, #seen, 2 do
  local other, v = seen[i], seen[i + 1]
  local sp = string.find(v, ' ', 1, true)
  local ms, oinst = tonumber(string.sub(v, 1, sp - 1)), string.sub(v, sp + 1)
  if other ~= node and now - ms > ttl and reap then
    for _, user in ipairs(redis.call('SMEMBERS', p .. ':pn:' .. other)) do
      down(user, other, ms + ttl + grace, '')
    end
    redis.call('DEL', p .. ':pn:' .. other, p .. ':off:' .. oinst)
    redis.call('HDEL', pseen, other)
  elseif other ~= node then
    alive[oinst] = true
  end
end
for _, user in ipairs(redis.call('ZRANGEBYSCORE', going, '-inf', now, 'LIMIT', 0, 500)) do
  local owner = redis.call('HGET', goingby, user) or ''
  if owner == inst or not alive[owner] then
    redis.call('ZREM', going, user)
    redis.call('HDEL', goingby, user)
    if redis.call('EXISTS', p .. ':pu:' .. user) == 0 then
      if redis.call('HDEL', online, user) == 1 then
        redis.call('HSET', p .. ':off:' .. inst, user, redis.call('INCR', p .. ':pseq'))
      end
    end
  end
end
return redis.call('HGETALL', p .. ':off:' .. inst)
"""
)

# The node stops: ARGV[4] the grace in ms, then the events it has queued
# (as for the sweep).  Its users start their grace period, owned by
# nobody: whichever node sweeps first when it is over posts the offline.
_LEAVE = (
    _PRELUDE
    + """
local grace = tonumber(ARGV[4])
ack(5)
for _, user in ipairs(redis.call('SMEMBERS', p .. ':pn:' .. node)) do
  down(user, node, now + grace, '')
end
redis.call('DEL', p .. ':pn:' .. node, p .. ':off:' .. inst)
redis.call('HDEL', pseen, node)
return 0
"""
)


@attr.s(slots=True, eq=False)
class _Here:
    """A user with non-public connections on this node."""

    connections: int = attr.ib(default=0)
    #: Redis has said the user is online (so after a loss of Redis's state
    #: it is put back without a second C{online}).
    confirmed: bool = attr.ib(default=False)


@implementer(IOnlineUsers)
@attr.s(eq=False)
class ClusterOnline:
    """
    This node's part in the cluster's presence events.  The gateway tells
    it of connections; the L{wsgw.cluster.node.Cluster} of the link.
    """

    registry: Registry = attr.ib()
    queue: IEventQueue = attr.ib()
    clock: IReactorTime = attr.ib()
    node_id: str = attr.ib()
    #: This process (a restart under the same node id is another instance).
    instance: str = attr.ib()
    keys: Keys = attr.ib(factory=Keys)
    grace: float = attr.ib(default=5.0)
    presence_ttl: float = attr.ib(default=15.0)
    #: How long a connection's events wait for Redis to say whether its user
    #: just came online.
    decide_timeout: float = attr.ib(default=2.0)

    went_online: int = attr.ib(default=0, init=False)
    went_offline: int = attr.ib(default=0, init=False)
    _events: PresenceEvents = attr.ib(init=False)
    _here: Dict[str, _Here] = attr.ib(factory=dict, init=False)
    #: Users whose last connection here ended: the connection whose stream
    #: carries their C{offline}, and when.
    _left: Dict[str, Tuple[Connection, float]] = attr.ib(factory=dict, init=False)
    _link: Optional[Any] = attr.ib(default=None, init=False)
    _linked_since: float = attr.ib(default=0.0, init=False)
    #: What Redis knows of this node's users may be wrong: say it all again.
    _unsure: bool = attr.ib(default=True, init=False)
    #: The state's mark as this node last saw it ('' before the first sync).
    _mark: str = attr.ib(default="", init=False)
    #: Events queued and not yet confirmed to Redis: (kind, user) -> number.
    _queued: Dict[Tuple[str, str], str] = attr.ib(factory=dict, init=False)
    _sweeping: bool = attr.ib(default=False, init=False)
    _sweeper: Optional[LoopingCall] = attr.ib(default=None, init=False)
    _soon: Optional[IDelayedCall] = attr.ib(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._events = PresenceEvents(self.queue)

    def __len__(self) -> int:
        return len(self._here)

    # -- IOnlineUsers ----------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        if conn.access_public:
            return
        name = conn.user_name
        here = self._here.get(name)
        if here is None:
            here = self._here[name] = _Here()
            self._left.pop(name, None)
        here.connections += 1
        if here.connections > 1:
            return
        if self._link is None or self._unsure:
            self._unsure = True
            return
        held = self.queue.hold(conn.conn_id)
        d = self._link.eval(_CHANGE, [], self._change(True, name))
        decision = _Decision(self, conn.conn_id, held)
        if held:
            decision.timer = self.clock.callLater(self.decide_timeout, decision.timed_out)
        d.addCallbacks(decision.answered, decision.failed)

    def ended(self, conn: Connection) -> None:
        if conn.access_public:
            return
        name = conn.user_name
        here = self._here.get(name)
        if here is None:
            return
        here.connections -= 1
        if here.connections:
            return
        del self._here[name]
        self._left[name] = (conn, self.clock.seconds())
        if self._link is None or self._unsure:
            self._unsure = True
            return
        d = self._link.eval(_CHANGE, [], self._change(False, name))
        d.addErrback(self._failed, "report a user leaving")
        self._sweep_after(self.grace)

    def shutting_down(self) -> None:
        """
        Nothing at once: the users' grace periods run on in the cluster (see
        L{leave}), so clients that move to another node stay online.
        """

    # -- the link (told by the Cluster) -----------------------------------------

    def connected(self, link: Any) -> None:
        self._link = link
        self._linked_since = self.clock.seconds()
        self._unsure = True
        self.sweep()

    def disconnected(self) -> None:
        self._link = None
        self._unsure = True

    def start(self) -> None:
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(min(SWEEP_INTERVAL, self.presence_ttl / 3), now=False)

    def leave(self) -> Deferred[Any]:
        """
        This node stops: its users' grace periods start, owned by whichever
        node sweeps first when they end.
        """
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        if self._link is None:
            return succeed(None)
        args = [self.keys.prefix, self.node_id, self.instance, self._grace_ms(), *self._acks()]
        d: Deferred[Any] = self._link.eval(_LEAVE, [], args)
        return d

    # -- sweeping --------------------------------------------------------------

    def sweep(self) -> Deferred[None]:
        """
        Say this node is alive, confirm what it queued, claim what is due
        (after saying everything again, if Redis may not know it).
        """
        if self._link is None or self._sweeping:
            return succeed(None)
        self._sweeping = True
        link = self._link
        d: Deferred[Any] = self._sync(link) if self._unsure else succeed(None)
        d.addCallback(lambda _: self._sweep_once(link))
        d.addErrback(self._failed, "sweep presence")
        d.addBoth(self._swept)
        return d

    def _swept(self, _: object) -> None:
        self._sweeping = False

    def _sweep_once(self, link: Any) -> Deferred[None]:
        now = self.clock.seconds()
        # Old enough never to be claimed here: it went to another node.
        for name, (_conn, when) in list(self._left.items()):
            if now - when > self.grace + 2 * self.presence_ttl:
                del self._left[name]
        reap = now - self._linked_since >= self.presence_ttl
        acks = self._acks()
        confirmed = dict(self._queued)
        args = [
            self.keys.prefix,
            self.node_id,
            self.instance,
            int(self.presence_ttl * 1000),
            self._grace_ms(),
            "1" if reap else "0",
            self._mark,
            *acks,
        ]
        d: Deferred[List[Any]] = link.eval(_SWEEP, [], args)

        def swept(result: List[Any]) -> None:
            if result and _text(result[0]) == "lost":
                log.warn("redis lost the presence state (restarted or flushed?); saying this node's users again")
                self._unsure = True
                return
            due = {_text(name): _text(number) for name, number in zip(result[::2], result[1::2])}
            for key, number in confirmed.items():
                # Still listed: Redis did not take the word; say it again.
                if self._queued.get(key) == number and not (key[0] == "offline" and due.get(key[1]) == number):
                    del self._queued[key]
            for name, number in due.items():
                self._post_offline(name, number)

        return d.addCallback(swept)

    def _sync(self, link: Any) -> Deferred[None]:
        self._unsure = False
        names = list(self._here)
        known = [name for name in names if self._here[name].confirmed]
        args = [self.keys.prefix, self.node_id, self.instance, self._grace_ms(), self._mark, len(names), *names, *known]
        d: Deferred[List[Any]] = link.eval(_SYNC, [], args)

        def synced(result: List[Any]) -> None:
            mark, pairs = _text(result[0]), result[1:]
            if self._mark and mark != self._mark:
                log.warn("presence state in redis is new; users online here were put back without a second online")
            self._mark = mark
            for name, record in zip(pairs[::2], pairs[1::2]):
                late = self._recorded(_text(name), _text(record), None)
                if late is not None:
                    self.queue.enqueue(late)

        def failed(failure: Failure) -> Failure:
            self._unsure = True
            return failure

        return d.addCallbacks(synced, failed)

    def _sweep_after(self, delay: float) -> None:
        if self._soon is not None and self._soon.active():
            return
        self._soon = self.clock.callLater(delay + 0.05, self.sweep)

    # -- posting ---------------------------------------------------------------

    def _recorded(self, name: str, record: str, stream: Optional[str]) -> Optional[Event]:
        """
        What Redis says of a user who has connections here: an C{online}
        event for this node to post, or None.
        """
        here = self._here.get(name)
        if here is not None:
            here.confirmed = True
        number, _, poster = record.partition(" ")
        if poster != self.instance or self._queued.get(("online", name)) == number:
            return None
        if stream is None:
            conn = self._a_connection_of(name)
            if conn is None:
                return None  # gone again: its grace period says the rest
            stream = conn.conn_id
        self._queued[("online", name)] = number
        self.went_online += 1
        return self._events.decided("online", name, f"presence:{number}", stream)

    def _post_offline(self, name: str, number: str) -> None:
        if self._queued.get(("offline", name)) == number:
            return
        self._queued[("offline", name)] = number
        left = self._left.pop(name, None)
        stream = left[0].conn_id if left is not None else f"presence:{name}"
        self.went_offline += 1
        self.queue.enqueue(self._events.decided("offline", name, f"presence:{number}", stream))

    def _a_connection_of(self, name: str) -> Optional[Connection]:
        for conn in self.registry.select(Targets(users=(name,))):
            if not conn.access_public:
                return conn
        return None

    # -- helpers ---------------------------------------------------------------

    def _change(self, came: bool, name: str) -> List[Any]:
        """The arguments of L{_CHANGE} for one user who came or went."""
        return [self.keys.prefix, self.node_id, self.instance, self._grace_ms(), 1 if came else 0, name]

    def _acks(self) -> List[Any]:
        flat: List[Any] = [len(self._queued)]
        for (kind, name), number in self._queued.items():
            flat += [kind, name, number]
        return flat

    def _grace_ms(self) -> int:
        return int(self.grace * 1000)

    def _failed(self, failure: Failure, what: str) -> None:
        # Redis went away (the link says so, once) or a script failed: say
        # everything again at the next sweep.
        self._unsure = True
        if not failure.check(*LINK_ERRORS):
            log.warn("could not {what}: {error}", what=what, error=failure.getErrorMessage())


@attr.s(slots=True, eq=False)
class _Decision:
    """Whether a connection's user just came online: its events wait for it."""

    online: ClusterOnline = attr.ib()
    stream: str = attr.ib()
    held: bool = attr.ib()
    timer: Optional[IDelayedCall] = attr.ib(default=None)

    def answered(self, result: List[Any]) -> None:
        self._cancel()
        event = None
        for name, record in zip(result[::2], result[1::2]):
            event = self.online._recorded(_text(name), _text(record), self.stream)
        self._release(event)

    def failed(self, failure: Failure) -> None:
        self._cancel()
        self.online._failed(failure, "ask whether a user came online")
        self._release(None)

    def timed_out(self) -> None:
        self.timer = None
        log.info("redis did not say in time whether a user came online; its events go on")
        self._release(None)

    def _release(self, event: Any) -> None:
        if self.held:
            self.held = False
            self.online.queue.release(self.stream, event)
        elif event is not None:
            self.online.queue.enqueue(event)

    def _cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
