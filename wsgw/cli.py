"""
wsgw-ctl: the gateway's API from a shell, so operators need not write
curl bodies by hand.

    wsgw-ctl list
    wsgw-ctl send '{"event":"notice"}' --user alice
    wsgw-ctl close --conn 2b0c…

Talks to --url (WSGW_URL, default http://127.0.0.1:40010) with the bearer
token from --admin-token (WSGW_ADMIN_TOKEN) when the gateway wants one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence

ACCESS = {"all": 0, "private": 1, "public": 2}


class ApiFailure(Exception):
    pass


def call(url: str, path: str, body: Optional[Dict[str, Any]], token: Optional[str], timeout: float = 10):
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(
        url.rstrip("/") + "/tapr/ws/conn/" + path, data=data, method="GET" if body is None else "POST"
    )
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as e:
        try:
            answer = json.load(e)
        except ValueError:
            raise ApiFailure(f"HTTP {e.code} from {url}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ApiFailure(f"cannot reach the gateway at {url}: {getattr(e, 'reason', e)}") from None
    if answer.get("code") != 0:
        raise ApiFailure(answer.get("message", "the gateway refused"))
    return answer


def targets(args) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    if args.user:
        body["users"] = args.user
        body["users_access_type"] = ACCESS[args.access]
    if args.token:
        body["tokens"] = args.token
    return body


def table(rows: List[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header] + rows
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def show_list(answer) -> str:
    rows: List[Sequence[str]] = []
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
    top.add_argument("--url", default=os.environ.get("WSGW_URL", "http://127.0.0.1:40010"))
    top.add_argument("--admin-token", default=os.environ.get("WSGW_ADMIN_TOKEN"))
    top.add_argument("--json", action="store_true", help="print the gateway's JSON answer")
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="open connections by user")
    for name, text in (("send", "send a JSON payload"), ("close", "close connections")):
        command = commands.add_parser(name, help=text)
        if name == "send":
            command.add_argument("payload", help="JSON value to send (with --text: any text, sent as a string)")
            command.add_argument("--text", action="store_true")
        command.add_argument("--conn", action="append", default=[], help="conn id (repeatable)")
        command.add_argument("--user", action="append", default=[], help="user name (repeatable)")
        command.add_argument("--token", action="append", default=[], help="auth token (repeatable)")
        command.add_argument("--access", choices=ACCESS, default="all", help="with --user: which connections")
    return top


#: What a cluster node says when some node could not be asked.
PARTIAL = "partial: some nodes were not reached (is Redis down?)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "list":
            answer = call(args.url, "list", None, args.admin_token)
            print(json.dumps(answer, indent=2) if args.json else show_list(answer))
            if answer.get("partial") and not args.json:
                print(f"wsgw-ctl: {PARTIAL}", file=sys.stderr)
            return 0
        body = targets(args)
        if args.command == "send":
            if args.text:
                body["payload"] = args.payload
            else:
                try:
                    body["payload"] = json.loads(args.payload)
                except ValueError as e:
                    print(
                        f"wsgw-ctl: the payload is not JSON ({e}); use --text to send it as a string", file=sys.stderr
                    )
                    return 2
            if len(args.conn) > 1:
                print("wsgw-ctl: send takes one --conn", file=sys.stderr)
                return 2
            if args.conn:
                body["conn_id"] = args.conn[0]
        elif args.conn:
            body["conns"] = args.conn
        answer = call(args.url, args.command, body, args.admin_token)
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
