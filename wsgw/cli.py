"""
wsgw-ctl: the gateway's API from a shell, so operators need not write
curl bodies by hand.

    wsgw-ctl list
    wsgw-ctl send '{"event":"notice"}' --user alice
    wsgw-ctl close --conn 2b0c…
    wsgw-ctl --url unix:/run/wsgw/admin.sock list

Talks to --url (WSGW_URL, default http://127.0.0.1:40010): an http:// or
https:// base URL, or unix:PATH for an API served on a UNIX socket
(--admin-listen unix:PATH).  The bearer token comes from --admin-token
(WSGW_ADMIN_TOKEN) or --admin-token-file (WSGW_ADMIN_TOKEN_FILE) when the
gateway wants one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from typing import Any, Dict, Optional, Sequence
from urllib.parse import urlsplit

from . import __version__
from .config import read_token_file

ACCESS = {"all": 0, "private": 1, "public": 2}


class ApiFailure(Exception):
    pass


class UNIXConnection(http.client.HTTPConnection):
    """HTTP over a UNIX stream socket, as C{--admin-listen unix:PATH} serves it."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the gateway at C{url} and the path prefix of its API."""
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if path.startswith("//"):  # unix:///run/wsgw/admin.sock
            path = path[2:]
        if not path:
            raise ApiFailure(f"{url!r} names no socket path; write unix:/run/wsgw/admin.sock")
        return UNIXConnection(path, timeout), ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiFailure(f"--url {url!r} must be http://HOST[:PORT], https://HOST[:PORT] or unix:PATH")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    try:
        return kind(parts.netloc, timeout=timeout), parts.path.rstrip("/")
    except http.client.InvalidURL as e:
        raise ApiFailure(f"--url {url!r}: {e}") from None


def call(url: str, path: str, body: Optional[Dict[str, Any]], token: Optional[str], timeout: float = 10) -> Any:
    conn, prefix = connection(url, timeout)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode("utf-8")
    try:
        conn.request("GET" if body is None else "POST", prefix + "/tapr/ws/conn/" + path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ApiFailure(f"cannot reach the gateway at {url}: {reason}") from None
    finally:
        conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ApiFailure(f"HTTP {response.status} from {url}") from None
    if not isinstance(answer, dict) or answer.get("code") != 0:
        message = answer.get("message") if isinstance(answer, dict) else None
        raise ApiFailure(message or f"HTTP {response.status} from {url}: the gateway refused")
    return answer


def read_token(path: str) -> str:
    """The token in C{path}, as the daemon reads its --admin-token-file."""
    try:
        return read_token_file(path)
    except ValueError as e:
        raise ApiFailure(f"--admin-token-file {path!r}: {e}") from None


def targets(args: argparse.Namespace) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    if args.user:
        body["users"] = args.user
        body["users_access_type"] = ACCESS[args.access]
    if args.token:
        body["tokens"] = args.token
    return body


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header, *rows]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def show_list(answer: Dict[str, Any]) -> str:
    rows = []
    for entry in answer["data"]:
        for access, conns in (("private", entry["conns"]), ("public", entry["public_conns"])):
            for conn in conns:
                token = conn["token"]
                rows.append(
                    [
                        entry["name"] or "(none)",
                        conn["id"],
                        access,
                        token[:4] + "…" if len(token) > 8 else token,
                        conn["userAgent"][:40],
                    ]
                )
    if not rows:
        return "no connections"
    return table(rows, ["USER", "CONN ID", "ACCESS", "TOKEN", "USER AGENT"]) + f"\n{len(rows)} connection(s)"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="wsgw-ctl", description="Use the wsgw API: list, send, close.")
    top.add_argument(
        "--url",
        default=os.environ.get("WSGW_URL", "http://127.0.0.1:40010"),
        help="the gateway: http://HOST:PORT, https://HOST:PORT, or unix:PATH for an API on a UNIX socket"
        " (--admin-listen unix:/run/wsgw/admin.sock) (env WSGW_URL; default http://127.0.0.1:40010)",
    )
    tokens = top.add_mutually_exclusive_group()
    tokens.add_argument("--admin-token", help="bearer token the API wants (env WSGW_ADMIN_TOKEN)")
    tokens.add_argument(
        "--admin-token-file", help="file holding that token, kept out of ps (env WSGW_ADMIN_TOKEN_FILE)"
    )
    top.add_argument("--json", action="store_true", help="print the gateway's JSON answer")
    top.add_argument("--version", action="version", version=f"wsgw-ctl {__version__}")
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="open connections by user")
    for name, text in (("send", "send a payload"), ("close", "close connections")):
        command = commands.add_parser(name, help=text)
        if name == "send":
            payload = command.add_mutually_exclusive_group(required=True)
            payload.add_argument("payload", nargs="?", help='JSON value to send, e.g. \'{"event":"notice"}\'')
            payload.add_argument(
                "--text",
                metavar="STRING",
                help="send STRING as it is, as one text frame (the API's text field), not as JSON",
            )
        command.add_argument("--conn", action="append", default=[], help="conn id (repeatable)")
        command.add_argument("--user", action="append", default=[], help="user name (repeatable)")
        command.add_argument("--token", action="append", default=[], help="auth token (repeatable)")
        command.add_argument("--access", choices=ACCESS, default="all", help="with --user: which connections")
    return top


def admin_token(args: argparse.Namespace) -> Optional[str]:
    """--admin-token, --admin-token-file, then their variables, as the daemon takes them."""
    if args.admin_token:
        return args.admin_token
    if args.admin_token_file:
        return read_token(args.admin_token_file)
    if os.environ.get("WSGW_ADMIN_TOKEN") and os.environ.get("WSGW_ADMIN_TOKEN_FILE"):
        raise ApiFailure("WSGW_ADMIN_TOKEN and WSGW_ADMIN_TOKEN_FILE are alternatives: set one of them")
    if os.environ.get("WSGW_ADMIN_TOKEN_FILE"):
        return read_token(os.environ["WSGW_ADMIN_TOKEN_FILE"])
    return os.environ.get("WSGW_ADMIN_TOKEN") or None


#: What a cluster node says when some node could not be asked.
PARTIAL = "partial: some nodes were not reached (is Redis down?)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        token = admin_token(args)
        if args.command == "list":
            answer = call(args.url, "list", None, token)
            print(json.dumps(answer, indent=2) if args.json else show_list(answer))
            if answer.get("partial") and not args.json:
                print(f"wsgw-ctl: {PARTIAL}", file=sys.stderr)
            return 0
        body = targets(args)
        if args.command == "send":
            if args.text is not None:
                body["text"] = args.text
            else:
                try:
                    body["payload"] = json.loads(args.payload)
                except ValueError as e:
                    print(
                        f"wsgw-ctl: the payload is not JSON ({e}); use --text STRING to send text as it is",
                        file=sys.stderr,
                    )
                    return 2
            if len(args.conn) > 1:
                print("wsgw-ctl: send takes one --conn", file=sys.stderr)
                return 2
            if args.conn:
                body["conn_id"] = args.conn[0]
        elif args.conn:
            body["conns"] = args.conn
        answer = call(args.url, args.command, body, token)
        data = answer.get("data", {})
        summary = f"{args.command}: {data.get('matched')} connection(s) matched"
        if data.get("partial"):
            summary += f" ({PARTIAL})"
        print(json.dumps(answer, indent=2) if args.json else summary)
        return 0
    except ApiFailure as e:
        print(f"wsgw-ctl: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
