"""
A noise-free measure of the request head path: C{StreamingChannel} fed a
canned browser-like C{GET} head over C{StringTransport}, answered at once
by a plain resource, CPU time per request (best of several runs).

    .venv/bin/python bench/head_micro.py [requests-per-run] [runs]

Run it with C{PYTHONPATH=<other checkout>/src} to compare two builds.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource

from clerkproxy import build_site


class Ok(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


HEAD = (
    b"GET /v1/client?__clerk_api_version=2025-11-10&_clerk_js_version=5.99.0"
    b" HTTP/1.1\r\n"
    b"Host: clerk.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"
    b" (KHTML, like Gecko) Chrome/130.0 Safari/537.36\r\n"
    b"Accept: */*\r\n"
    b"Accept-Language: en-GB,en;q=0.9\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Origin: https://example.com\r\n"
    b"Referer: https://example.com/\r\n"
    b"Cookie: __client=abcdefghijklmnopqrstuvwxyz0123456789;"
    b" __client_uat=1700000000\r\n"
    b"Sec-Fetch-Dest: empty\r\n"
    b"Sec-Fetch-Mode: cors\r\n"
    b"Sec-Fetch-Site: same-site\r\n"
    b"X-Forwarded-For: 10.0.0.1\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)


def run(requests: int) -> float:
    """CPU seconds per request for one connection serving C{requests}."""
    site = build_site(Ok(), MemoryReactorClock())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    received = channel.dataReceived
    started = time.process_time()
    for i in range(requests):
        received(HEAD)
        if i % 256 == 0:
            transport.clear()
    return (time.process_time() - started) / requests


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    best = min(run(requests) for _ in range(runs))
    print(f"{best * 1e6:.1f} µs per request")


if __name__ == "__main__":
    main()
