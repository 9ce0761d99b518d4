"""
Hostile clients for the benchmark's scenarios, run as their own process so
that their work does not slow the ordinary client that measures the proxy.

    python bench/attack.py KIND --port P --count N --hold S [--interval I]

KIND is one of:

- ``stalled-readers``: each client sets a 4 KiB receive buffer, asks for a
  large answer (``--path``) and then reads nothing.
- ``slow-readers``: the same, but each reads one byte per ``--interval``.
- ``slow-uploads``: each sends a request head announcing a body
  (``Content-Length``) and then one byte of it per ``--interval``.
- ``slowloris``: each sends a request line and then one header line per
  ``--interval``, never ending the head.

A slow upload or slowloris client that the server answers or closes opens a
new connection in its place, as those attacks do; a reader does not.

Loopback only, bounded in count and time: the clients connect (at most 200
at once), the process prints ``ready`` and a JSON line, holds them until its
standard input closes or ``--hold`` seconds pass, closes every socket, prints
a JSON line of counts and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import sys
import time
from typing import Any

KINDS = ("stalled-readers", "slow-readers", "slow-uploads", "slowloris")
HOST = "127.0.0.1"
CONNECT_TIMEOUT = 10.0
RECONNECT_PAUSE = 0.1
TCP_ESTABLISHED = 1


class Attack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.kind: str = args.kind
        self.port: int = args.port
        self.count: int = args.count
        self.interval: float = args.interval
        self.path: str = args.path
        self.body_size: int = args.body_size
        self.sockets: set[socket.socket] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.counts: dict[str, int] = {
            "connected": 0,
            "connect_failed": 0,
            "cut_by_server": 0,
            "reconnects": 0,
            "bytes_read": 0,
            "bytes_sent": 0,
        }
        self.holding = True

    def head(self) -> bytes:
        if self.kind in ("stalled-readers", "slow-readers"):
            return f"GET {self.path} HTTP/1.1\r\nHost: bench.test\r\n\r\n".encode()
        if self.kind == "slow-uploads":
            return (
                f"POST {self.path} HTTP/1.1\r\nHost: bench.test\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {self.body_size}\r\n\r\n"
            ).encode()
        return f"GET {self.path} HTTP/1.1\r\nHost: bench.test\r\n".encode()

    async def connect(self) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.kind.endswith("readers"):
            # Before connecting, so that the advertised window stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            await asyncio.wait_for(
                loop.sock_connect(sock, (HOST, self.port)), CONNECT_TIMEOUT
            )
            await asyncio.wait_for(loop.sock_sendall(sock, self.head()), 5.0)
        except (OSError, asyncio.TimeoutError):
            sock.close()
            self.counts["connect_failed"] += 1
            return None
        self.counts["connected"] += 1
        self.sockets.add(sock)
        return sock

    def drop(self, sock: socket.socket) -> None:
        self.sockets.discard(sock)
        sock.close()

    def answered(self, sock: socket.socket) -> bool:
        """Has the server answered or closed C{sock}?  Reads without waiting."""
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        self.counts["bytes_read"] += len(data)
        return True

    async def slow_reader(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while self.holding:
            await asyncio.sleep(self.interval)
            try:
                data = await loop.sock_recv(sock, 1)
            except OSError:
                data = b""
            if not data:
                self.counts["cut_by_server"] += 1
                self.drop(sock)
                return
            self.counts["bytes_read"] += len(data)

    async def trickler(self, sock: socket.socket | None) -> None:
        """One slow-upload or slowloris client, reconnecting when cut."""
        sent = 0
        while self.holding:
            if sock is None:
                await asyncio.sleep(RECONNECT_PAUSE)
                if not self.holding:
                    return
                sock = await self.connect()
                sent = 0
                if sock is not None:
                    self.counts["reconnects"] += 1
                continue
            await asyncio.sleep(self.interval)
            if self.answered(sock):
                self.counts["cut_by_server"] += 1
                self.drop(sock)
                sock = None
                continue
            if self.kind == "slow-uploads":
                if sent >= self.body_size:
                    continue  # the whole body went; wait for the answer
                piece = b"a"
            else:
                piece = f"X-Slow-{sent}: {sent}\r\n".encode()
            try:
                sock.send(piece, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                self.counts["cut_by_server"] += 1
                self.drop(sock)
                sock = None
                continue
            sent += len(piece)
            self.counts["bytes_sent"] += len(piece)

    async def open_all(self) -> None:
        semaphore = asyncio.Semaphore(200)

        async def one() -> None:
            async with semaphore:
                sock = await self.connect()
            if self.kind == "slow-readers" and sock is not None:
                self.tasks.append(asyncio.create_task(self.slow_reader(sock)))
            elif self.kind in ("slow-uploads", "slowloris"):
                self.tasks.append(asyncio.create_task(self.trickler(sock)))

        await asyncio.gather(*(one() for _ in range(self.count)))

    def still_open(self) -> int:
        """Sockets the kernel still calls established (stalled readers
        cannot see a close behind their full receive buffer otherwise)."""
        alive = 0
        for sock in self.sockets:
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
            except OSError:
                continue
            if struct.unpack("B", info[:1])[0] == TCP_ESTABLISHED:
                alive += 1
        return alive

    def answered_count(self) -> int:
        """Sockets with answer bytes waiting unread (stalled readers)."""
        waiting = 0
        for sock in self.sockets:
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    waiting += 1
            except OSError:
                continue
        return waiting

    async def run(self, hold: float) -> dict[str, Any]:
        started = time.monotonic()
        await self.open_all()
        ramp = time.monotonic() - started
        emit({"ready": True, "ramp_seconds": round(ramp, 2), **self.counts})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                stop.set()

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(stop.wait(), hold)
        except asyncio.TimeoutError:
            loop.remove_reader(fd)
        self.holding = False
        result = dict(
            self.counts,
            established_at_end=self.still_open(),
            answered_at_end=self.answered_count(),
        )
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for sock in list(self.sockets):
            self.drop(sock)
        return result


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--hold", type=float, required=True, help="at most, seconds")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between trickles"
    )
    parser.add_argument("--path", default="/__clerk/big")
    parser.add_argument("--body-size", type=int, default=65536)
    args = parser.parse_args()
    result = asyncio.run(Attack(args).run(args.hold))
    emit(result)


if __name__ == "__main__":
    main()
