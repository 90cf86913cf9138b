"""
Telling systemd how the daemon is doing, over the C{NOTIFY_SOCKET} datagram
protocol (sd_notify): C{READY=1} once every listener is up, C{STOPPING=1}
when shutdown begins, and C{WATCHDOG=1} pings while the reactor runs.
"""

from __future__ import annotations

import os
import socket
from typing import List, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Send one sd_notify message; L{False} when not run by systemd.
    """
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(message.encode("utf-8"))
    except OSError as e:
        log.warn("cannot notify systemd at {path}: {error}", path=path, error=e.strerror)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> Optional[float]:
    """
    Seconds between watchdog pings (half of C{WatchdogSec}), or L{None}.
    """
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2 / 1_000_000
    except ValueError:
        return None


class SystemdNotifier(Service):
    """
    Reports readiness once C{listening} fires, pings the watchdog, and says
    when shutdown begins.  Add it last to the daemon's service, so it is
    stopped (and says C{STOPPING=1}) first.
    """

    def __init__(
        self, listening: Deferred[List[IListeningPort]], reactor: IReactorTime, environ: Mapping[str, str] = os.environ
    ):
        self.listening = listening
        self.reactor = reactor
        self.environ = environ
        self._watchdog: Optional[LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        if not self.environ.get("NOTIFY_SOCKET"):
            return
        self.listening.addCallback(self._ready)
        interval = watchdog_interval(self.environ)
        if interval:
            self._watchdog = LoopingCall(notify, "WATCHDOG=1", self.environ)
            self._watchdog.clock = self.reactor
            self._watchdog.start(interval, now=True)

    def _ready(self, ports: List[IListeningPort]) -> List[IListeningPort]:
        where = ", ".join(str(port.getHost()) for port in ports)
        notify(f"READY=1\nSTATUS=serving on {where}", self.environ)
        return ports

    def stopService(self) -> None:
        super().stopService()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        if self.environ.get("NOTIFY_SOCKET"):
            notify("STOPPING=1\nSTATUS=closing connections and draining", self.environ)
