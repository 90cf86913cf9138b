"""
Transitional: the old name of the app client, for C{wsgw.service} until it
builds an L{wsgw.eventpost.EventPoster} and the forwarder posts
L{wsgw.events.Event} records.  Delete this module then.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from .eventpost import EventPoster, build_http_client

__all__ = ["AppClient", "build_http_client"]


class AppClient:
    """C{post(body, headers)} as the forwarder calls it before Event records."""

    def __init__(self, client: Any, url: str, clock: Any, timeout: float = 10.0) -> None:
        self._poster = EventPoster(client, url, clock, timeout)

    def __call__(self, body: bytes, headers: Dict[bytes, List[bytes]]) -> Deferred[int]:
        return self._poster.send(body, Headers(headers))
