"""
The app's HTTP API under C{/tapr/ws/conn/}: C{send}, C{close} and C{list}.

Every answer is JSON with C{code} (0 on success) and C{message}; an error
also carries the matching HTTP status and names what was wrong.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .events import decode_json, to_json
from .gateway import Gateway
from .registry import AccessType

log = Logger()


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_REASONS = {426: b"Upgrade Required"}


def json_response(request, status: int, body: Dict[str, Any]) -> bytes:
    request.setResponseCode(status, _REASONS.get(status))
    request.setHeader(b"Content-Type", b"application/json")
    return to_json(body)


def error_response(request, status: int, message: str) -> bytes:
    return json_response(request, status, {"code": status, "message": message})


def read_json_object(request, max_body: int) -> Dict[str, Any]:
    if getattr(request, "too_large", False):
        raise ApiError(413, f"request body is over the limit of {max_body} bytes")
    content = request.content
    content.seek(0, 2)
    size = content.tell()
    if size > max_body:
        raise ApiError(413, f"request body is {size} bytes; the limit is {max_body}")
    content.seek(0)
    raw = content.read()
    try:
        body = decode_json(raw.decode("utf-8")) if raw.strip() else {}
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def string_list(body: Dict[str, Any], field: str, drop_empty: bool = False) -> List[str]:
    """
    The list of strings in C{field}.  An empty user name is a real target
    (connections without the user header have it); an empty conn id is not.
    """
    value = body.get(field)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{field} must be a list of strings")
    return [v for v in value if v] if drop_empty else value


def optional_string(body: Dict[str, Any], field: str) -> List[str]:
    value = body.get(field)
    if value is None or value == "":
        return []
    if not isinstance(value, str):
        raise ApiError(400, f"{field} must be a string")
    return [value]


def access_type(body: Dict[str, Any]) -> AccessType:
    value = body.get("users_access_type")
    if value is None:
        return AccessType.ALL
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1, 2):
        raise ApiError(400, "users_access_type must be 0 (all), 1 (private) or 2 (public)")
    return AccessType(value)


@attr.s(frozen=True)
class Targets:
    conn_ids: Sequence[str] = attr.ib()
    users: Sequence[str] = attr.ib()
    tokens: Sequence[str] = attr.ib()
    access: AccessType = attr.ib()

    @classmethod
    def from_body(cls, body: Dict[str, Any], conn_field: str, what: str) -> Targets:
        conn_ids = (
            string_list(body, conn_field, drop_empty=True)
            if conn_field == "conns"
            else optional_string(body, conn_field)
        )
        targets = cls(conn_ids, string_list(body, "users"), string_list(body, "tokens"), access_type(body))
        if not (targets.conn_ids or targets.users or targets.tokens):
            raise ApiError(400, f"{what} target is nil: give {conn_field}, users or tokens")
        return targets

    def criteria(self) -> tuple:
        return self.conn_ids, self.users, self.tokens, self.access


class JsonEndpoint(Resource):
    """
    One API endpoint: turns L{ApiError}s and unexpected failures into JSON
    answers, and unsupported methods into 405.
    """

    isLeaf = True
    methods: Sequence[bytes] = ()

    def __init__(self, gateway: Gateway, max_body: int):
        super().__init__()
        self.gateway = gateway
        self.max_body = max_body

    def render(self, request):
        if request.method not in self.methods:
            request.setHeader(b"Allow", b", ".join(self.methods))
            return error_response(
                request,
                405,
                f"method {request.method.decode('ascii', 'replace')} not allowed; use {self.methods[0].decode()}",
            )
        try:
            answer = self.answer(request)
        except ApiError as e:
            log.info("API {path} refused: {message}", path=request.path, message=e.message)
            return error_response(request, e.status, e.message)
        except Exception:
            log.failure("API {path} failed", path=request.path)
            return error_response(request, 500, "internal error; see the gateway's log")
        if isinstance(answer, Deferred):
            # A cluster-wide answer: the other nodes are asked through Redis.
            answer.addCallbacks(self._answered, self._failed, callbackArgs=(request,), errbackArgs=(request,))
            return NOT_DONE_YET
        return json_response(request, 200, answer)

    def _answered(self, answer, request) -> None:
        if not request.channel:  # the caller hung up meanwhile
            return
        request.write(json_response(request, 200, answer))
        request.finish()

    def _failed(self, failure, request) -> None:
        log.failure("API {path} failed", failure, path=request.path)
        if request.channel:
            request.write(error_response(request, 500, "internal error; see the gateway's log"))
            request.finish()

    def answer(self, request):
        """The answer's body, or a L{Deferred} of it."""
        raise NotImplementedError


def encode_payload(body: Dict[str, Any]) -> bytes:
    return to_json(body.get("payload"))


def reach_answer(matched: int, partial: bool = False) -> Dict[str, Any]:
    data: Dict[str, Any] = {"matched": matched}
    if partial:
        # Some node was not reached (Redis down, a node not answering).
        data["partial"] = True
    return {"code": 0, "message": "success", "data": data}


def _reached(reach) -> Dict[str, Any]:
    return reach_answer(reach.matched, reach.partial)


class SendEndpoint(JsonEndpoint):
    methods = (b"POST",)

    def answer(self, request):
        body = read_json_object(request, self.max_body)
        targets = Targets.from_body(body, "conn_id", "send message")
        payload = encode_payload(body)
        cluster = self.gateway.cluster
        if cluster is None:
            return reach_answer(self.gateway.send(payload, *targets.criteria()))
        return cluster.send(payload, *targets.criteria()).addCallback(_reached)


class CloseEndpoint(JsonEndpoint):
    methods = (b"POST",)

    def answer(self, request):
        body = read_json_object(request, self.max_body)
        targets = Targets.from_body(body, "conns", "close")
        cluster = self.gateway.cluster
        if cluster is None:
            return reach_answer(self.gateway.close(*targets.criteria()))
        return cluster.close(*targets.criteria()).addCallback(_reached)


def _listed(result) -> Dict[str, Any]:
    entries, partial = result
    answer: Dict[str, Any] = {"code": 0, "message": "success", "data": entries}
    if partial:
        answer["partial"] = True
    return answer


class ListEndpoint(JsonEndpoint):
    methods = (b"GET",)

    def answer(self, request):
        cluster = self.gateway.cluster
        if cluster is None:
            return {"code": 0, "message": "success", "data": self.gateway.listing()}
        return cluster.listing().addCallback(_listed)


class JsonNotFound(Resource):
    isLeaf = True

    def render(self, request):
        return error_response(request, 404, f"no such path: {request.path.decode('utf-8', 'replace')}")


class JsonTree(Resource):
    """
    A resource whose unknown children answer 404 in JSON.
    """

    def getChild(self, path, request):
        return JsonNotFound()

    def render(self, request):
        return JsonNotFound().render(request)


def conn_api(gateway: Gateway, max_body: int) -> Resource:
    """
    The C{/tapr/ws/conn} resource with its three endpoints.
    """
    conn = JsonTree()
    conn.putChild(b"send", SendEndpoint(gateway, max_body))
    conn.putChild(b"close", CloseEndpoint(gateway, max_body))
    conn.putChild(b"list", ListEndpoint(gateway, max_body))
    return conn
