"""
The in-process drivers' app (C{bench.eventpath}, C{bench.appclient}): an
asyncio server in a subprocess on a loopback ephemeral port that reads
requests framed by C{Content-Length}, pipelined or cut anywhere, and
answers each with what the driver's C{answer} makes of its body.  It runs
in its own process so that none of its work counts as the gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from typing import Any, Callable, Iterator, List


class _App(asyncio.Protocol):
    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.answer = answer
        self.buffer = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                break
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            out.append(self.answer(body))
        if out:
            self.transport.write(b"".join(out))


def serve(answer: Callable[[bytes], bytes]) -> None:
    """Serve until killed; the first line printed is the port."""

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: _App(answer), "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


@contextlib.contextmanager
def running(argv: List[str]) -> Iterator[int]:
    """Run C{python argv...} (a driver's C{--serve}) for the block; yields its port."""
    app = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None
        yield int(app.stdout.readline())
    finally:
        app.terminate()
        app.wait()
