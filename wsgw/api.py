"""
The app's HTTP API under C{/tapr/ws/conn/}: C{send}, C{close} and C{list}.

Every answer is JSON with C{code} (0 on success) and C{message}; an error
also carries the matching HTTP status and names what was wrong.
"""

from __future__ import annotations

import base64
import binascii
from io import BytesIO
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .interfaces import IAnswerFirst, IConnections, IConnectionsHere, Listing, Reach
from .jsonio import decode_json, error_response, to_json
from .registry import AccessType, Targets, plain_targets

log = Logger()

Answer = Dict[str, Any]


class ApiError(Exception):
    """A request the API refuses: its status and what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _no_default(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


#: C{to_json}'s encoder (compact, not ASCII-only) made once, not per call,
#: and without its check for circular references: a payload read from JSON
#: has none.
_encode_chunks: Optional[Callable[[Any, int], Sequence[str]]] = (
    None
    if c_make_encoder is None
    else c_make_encoder(None, _no_default, encode_basestring, None, ":", ",", False, False, True)
)


def payload_json(value: Any) -> bytes:
    """L{to_json} of a value read from JSON (a C{send}'s payload), the same bytes for less."""
    if _encode_chunks is None:
        return to_json(value)
    try:
        return "".join(_encode_chunks(value, 0)).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: to_json's ASCII escapes
        return to_json(value)


def read_json_object(request: Request, max_body: int) -> Dict[str, Any]:
    if getattr(request, "too_large", False):
        raise ApiError(413, f"request body is over the limit of {max_body} bytes")
    # Set for every request that has come in whole.  (Annotated, not cast:
    # C{IO[bytes]} is a subscription of typing's, two Python calls per call.)
    content: IO[bytes] = request.content  # type: ignore[assignment]
    if isinstance(content, BytesIO):
        raw = content.getvalue()
        size = len(raw)
    else:  # twisted.web spools a large body to a file
        content.seek(0, 2)
        size = content.tell()
        content.seek(0)
        raw = b"" if size > max_body else content.read()
    if size > max_body:
        raise ApiError(413, f"request body is {size} bytes; the limit is {max_body}")
    try:
        # A body that starts with its object's brace is not blank: no
        # stripped copy of it to find that out.
        body = decode_json(raw.decode("utf-8")) if raw[:1] == b"{" or raw.strip() else {}
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


def read_targets(body: Dict[str, Any], conn_field: str, what: str) -> Targets:
    """
    The L{Targets} of a C{send} (one C{conn_id}) or C{close} (a C{conns}
    list); at least one criterion is required.
    """
    if conn_field == "conn_id" and "tokens" not in body and "users_access_type" not in body:
        # The common calls, as the rules below read them: one connection,
        # or the connections of a list of users.
        if "users" not in body:
            conn_id = body.get("conn_id")
            if type(conn_id) is str and conn_id:
                return plain_targets(conn_ids=(conn_id,))
        elif "conn_id" not in body:
            users = body["users"]
            if type(users) is list and users and all(type(user) is str for user in users):
                return plain_targets(users=tuple(users))
    conn_ids = (
        string_list(body, conn_field, drop_empty=True) if conn_field == "conns" else optional_string(body, conn_field)
    )
    targets = Targets(
        conn_ids=conn_ids,
        users=string_list(body, "users"),
        tokens=string_list(body, "tokens"),
        access=access_type(body),
    )
    if not targets:
        raise ApiError(400, f"{what} target is nil: give {conn_field}, users or tokens")
    return targets


class JsonEndpoint(Resource):
    """
    One API endpoint: turns L{ApiError}s and unexpected failures into JSON
    answers, and unsupported methods into 405.
    """

    isLeaf = True
    methods: Sequence[bytes] = ()

    def __init__(self, connections: IConnections, max_body: int):
        super().__init__()
        self.connections = connections
        self.max_body = max_body

    def render(self, request: Request) -> Union[bytes, int]:
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
            log.info("API {path} refused: {message}", path=request.path.decode("utf-8", "replace"), message=e.message)
            return error_response(request, e.status, e.message)
        except Exception:
            log.failure("API {path} failed", path=request.path.decode("utf-8", "replace"))
            return error_response(request, 500, "internal error; see the gateway's log")
        # A Reach (a send here) is told from a Deferred by its type first:
        # Deferred is generic, so isinstance() goes through ABCMeta's
        # check, a Python call of its own, on every call.
        if type(answer) is Reach or not isinstance(answer, Deferred):
            return self._success(request, answer)  # this process's own gateway: known at once
        if answer.called and not answer.paused:
            # Known at once (targets all on this node).
            outcome = answer.result
            if isinstance(outcome, Failure):
                answer.addErrback(lambda _: None)  # logged here, not again when collected
                log.failure("API {path} failed", outcome, path=request.path.decode("utf-8", "replace"))
                return error_response(request, 500, "internal error; see the gateway's log")
            return self._success(request, outcome)
        # A cluster asks the other nodes through Redis first.
        answer.addCallbacks(self._answered, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        return NOT_DONE_YET

    def _success(self, request: Request, outcome: Any) -> bytes:
        """The 200 answer to C{outcome}; a failure to shape it is a logged 500, as a failed answer is."""
        try:
            body = self.shape(outcome)
        except Exception:
            log.failure("API {path} failed", path=request.path.decode("utf-8", "replace"))
            return error_response(request, 500, "internal error; see the gateway's log")
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        return body

    def _answered(self, outcome: Any, request: Request) -> None:
        if not request.channel:  # the caller hung up meanwhile
            return
        request.write(self._success(request, outcome))
        request.finish()

    def _failed(self, failure: Failure, request: Request) -> None:
        log.failure("API {path} failed", failure, path=request.path.decode("utf-8", "replace"))
        if request.channel:
            request.write(error_response(request, 500, "internal error; see the gateway's log"))
            request.finish()

    def answer(self, request: Request) -> Union[Deferred[Any], Any]:
        """What the call did (for L{shape}): now, or a L{Deferred} of it."""
        raise NotImplementedError

    def shape(self, outcome: Any) -> bytes:
        """The body of the 200 answer to C{outcome}, ending in a newline."""
        raise NotImplementedError


def reach_answer(reach: Reach) -> Answer:
    data: Answer = {"matched": reach.matched}
    if reach.partial:
        # Some node was not reached (Redis down, a node not answering).
        data["partial"] = True
    return {"code": 0, "message": "success", "data": data}


#: C{to_json(reach_answer(reach)) + b"\n"} by C{reach.partial}: every
#: C{send} and C{close} is answered with one of the two.
_REACH_BODIES = (
    b'{"code":0,"message":"success","data":{"matched":%d}}\n',
    b'{"code":0,"message":"success","data":{"matched":%d,"partial":true}}\n',
)


def reach_body(reach: Reach) -> bytes:
    """The answer's body to a C{send} or C{close}: L{reach_answer}'s JSON, not built and encoded per call."""
    return _REACH_BODIES[1 if reach.partial else 0] % (reach.matched,)


def list_answer(listing: Listing) -> Answer:
    answer: Answer = {"code": 0, "message": "success", "data": listing.entries}
    if listing.partial:
        answer["partial"] = True
    return answer


_FRAME_FIELDS = ("payload", "text", "binary")


def read_frame(body: Dict[str, Any]) -> Tuple[bytes, bool]:
    """
    What a C{send} sends, and whether as a binary frame: C{payload} (a JSON
    value, encoded once; absent, C{null} as in the original), C{text} (a
    string sent as it is) or C{binary} (base64).  One of them at most.
    """
    if "text" not in body and "binary" not in body:
        return payload_json(body.get("payload")), False  # the common call, without the checks below
    given = [field for field in _FRAME_FIELDS if field in body]
    if len(given) > 1:
        raise ApiError(400, f"give one of payload, text or binary, not {' and '.join(given)}")
    if "text" in body:
        text = body["text"]
        if not isinstance(text, str):
            raise ApiError(400, "text must be a string (it is sent as it is, as one text frame)")
        try:
            return text.encode("utf-8"), False
        except UnicodeEncodeError:
            raise ApiError(400, "text must be valid Unicode: it holds a lone surrogate") from None
    if "binary" in body:
        data = body["binary"]
        if not isinstance(data, str):
            raise ApiError(400, "binary must be a base64 string")
        try:
            return base64.b64decode(data, validate=True), True
        except (binascii.Error, ValueError):
            raise ApiError(400, "binary must be standard base64 (A-Z, a-z, 0-9, +, /, = padding)") from None
    return payload_json(body.get("payload")), False


#: What a C{send} here reached, for the usual counts: made once (the
#: record is frozen), not per call.
_REACHES = tuple(Reach(matched) for matched in range(64))


class SendEndpoint(JsonEndpoint):
    methods = (b"POST",)

    def __init__(self, connections: IConnections, max_body: int):
        super().__init__(connections, max_body)
        #: This process's own connections, when they are all there are.
        self._here = IConnectionsHere(connections, None)

    def answer(self, request: Request) -> Union[Deferred[Reach], Reach]:
        body = read_json_object(request, self.max_body)
        targets = read_targets(body, "conn_id", "send message")
        payload, binary = read_frame(body)
        if self._here is not None:
            # Whom it reaches is known once they are chosen: the answer can
            # go out before a fan-out, the frames right after it.
            first = request if IAnswerFirst.providedBy(request) else None
            matched = self._here.send_here(payload, targets, binary, first)
            return _REACHES[matched] if matched < len(_REACHES) else Reach(matched)
        return self.connections.send(payload, targets, binary)

    def shape(self, outcome: Any) -> bytes:
        return reach_body(outcome)


class CloseEndpoint(JsonEndpoint):
    methods = (b"POST",)

    def answer(self, request: Request) -> Deferred[Reach]:
        targets = read_targets(read_json_object(request, self.max_body), "conns", "close")
        return self.connections.close(targets)

    def shape(self, outcome: Any) -> bytes:
        return reach_body(outcome)


class ListEndpoint(JsonEndpoint):
    methods = (b"GET",)

    def answer(self, request: Request) -> Deferred[Listing]:
        return self.connections.listing()

    def shape(self, outcome: Any) -> bytes:
        return to_json(list_answer(outcome)) + b"\n"


class JsonNotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return error_response(request, 404, f"no such path: {request.path.decode('utf-8', 'replace')}")


class JsonTree(Resource):
    """
    A resource whose unknown children answer 404 in JSON.
    """

    def getChild(self, path: bytes, request: Request) -> Resource:
        return JsonNotFound()

    def render(self, request: Request) -> bytes:
        return JsonNotFound().render(request)


def conn_api(connections: IConnections, max_body: int) -> Resource:
    """
    The C{/tapr/ws/conn} resource with its three endpoints.
    """
    conn = JsonTree()
    conn.putChild(b"send", SendEndpoint(connections, max_body))
    conn.putChild(b"close", CloseEndpoint(connections, max_body))
    conn.putChild(b"list", ListEndpoint(connections, max_body))
    return conn
