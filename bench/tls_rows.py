"""
TLS termination rows: clients speak TLS to the contender (clerkproxy with
``--tls-cert``, nginx's recipe with ``listen ... ssl``).

- keep-alive: ``wrk`` over https, as the plain rows (req/s, latency, CPU);
- handshakes: clients that open a connection, make one request and close,
  as fast as they can, with session resumption off (a full handshake each
  time) and on (each client offers the session of its previous connection).
  The figure is new connections per CPU-second of the contender, i.e. per
  core; the share of connections that did resume is reported beside it.
"""

from __future__ import annotations

import multiprocessing
import socket
import ssl
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import run as harness

TLS_PORT = 8803


@dataclass
class TLSSample:
    rps: float
    p99_ms: float
    p999_ms: float
    cpu_per_1k: float
    errors: int


@dataclass
class HandshakeSample:
    resume: bool
    per_second: float
    per_cpu_second: float
    resumed_share: float
    errors: int


@dataclass
class TLSResults:
    keepalive: dict[str, list[TLSSample]] = field(default_factory=dict)
    handshakes: dict[str, list[HandshakeSample]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "keepalive": {
                k: {"samples": [asdict(x) for x in v], "median": _median(v)}
                for k, v in self.keepalive.items()
            },
            "handshakes": {
                k: {"samples": [asdict(x) for x in v], "median": _median(v)}
                for k, v in self.handshakes.items()
            },
        }


def _median(samples: list[Any]) -> dict[str, float]:
    names = [n for n, v in asdict(samples[0]).items() if not isinstance(v, bool)]
    return {n: statistics.median(getattr(x, n) for x in samples) for n in names}


def clerkproxy_tls(s: harness.Setup, port: int) -> subprocess.Popen[bytes]:
    extra = [
        "--port",
        f"tls:tcp:{port}:interface=127.0.0.1:backlog=1024",
        "--tls-cert",
        str(s.cert),
        "--tls-key",
        str(s.key),
    ]
    return subprocess.Popen(
        harness.clerkproxy_argv(s, extra),
        env=harness.proxy_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=harness.raise_fd_limit,
    )


CONTENDERS: dict[str, tuple[str, Callable[[harness.Setup, int], Any]]] = {
    "clerkproxy": ("clerkproxy --tls-cert", clerkproxy_tls),
    "nginx-recipe": (
        "nginx (Clerk's recipe, listen ssl)",
        harness.nginx_contender(False, listen_ssl=True),
    ),
}


def _check(s: harness.Setup, port: int) -> None:
    context = ssl.create_default_context(cafile=str(s.ca))
    with urllib.request.urlopen(
        f"https://localhost:{port}{harness.TARGET}", timeout=10, context=context
    ) as r:
        body = r.read()
    if r.status != 200 or b'"object":"client"' not in body:
        raise RuntimeError(f"TLS contender answered {r.status}: {body[:200]!r}")


def _client(
    port: int, seconds: float, resume: bool, cafile: str, out: Any
) -> None:  # pragma: no cover - runs in a child process
    context = ssl.create_default_context(cafile=cafile)
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    request = (
        f"GET {harness.TARGET} HTTP/1.1\r\nHost: bench.test\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    session = None
    done = resumed = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(
                    raw, server_hostname="localhost", session=session
                ) as sock:
                    sock.sendall(request)
                    data = b""
                    while chunk := sock.recv(65536):
                        data += chunk
                    if not data.startswith(b"HTTP/1.1 200"):
                        errors += 1
                        continue
                    done += 1
                    resumed += sock.session_reused
                    if resume:
                        session = sock.session
        except (OSError, ssl.SSLError):
            errors += 1
    out.put((done, resumed, errors))


def handshakes(
    pid: int, port: int, seconds: float, resume: bool, cafile: str, clients: int
) -> HandshakeSample:
    queue: Any = multiprocessing.get_context("fork").Queue()
    workers = [
        multiprocessing.get_context("fork").Process(
            target=_client, args=(port, seconds, resume, cafile, queue)
        )
        for _ in range(clients)
    ]
    cpu = harness.cpu_seconds(pid)
    started = time.monotonic()
    for w in workers:
        w.start()
    totals = [queue.get(timeout=seconds + 60) for _ in workers]
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    cpu = harness.cpu_seconds(pid) - cpu
    done = sum(t[0] for t in totals)
    return HandshakeSample(
        resume,
        done / elapsed,
        done / max(cpu, 1e-9),
        sum(t[1] for t in totals) / max(done, 1),
        sum(t[2] for t in totals),
    )


def one_round(
    s: harness.Setup,
    key: str,
    seconds: float,
    warmup: float,
    connections: int,
    handshake_seconds: float,
    clients: int,
    results: TLSResults,
) -> None:
    port = TLS_PORT
    with harness.running(CONTENDERS[key][1], s, port) as process:
        _check(s, port)
        harness.run_wrk(port, warmup, connections, scheme="https")
        cpu = harness.cpu_seconds(process.pid)
        rps, _, p99, p999, total, errors = harness.run_wrk(
            port, seconds, connections, scheme="https"
        )
        cpu = harness.cpu_seconds(process.pid) - cpu
        results.keepalive.setdefault(key, []).append(
            TLSSample(rps, p99, p999, 1000 * cpu / max(total, 1), errors)
        )
        for resume in (False, True):
            sample = handshakes(
                process.pid, port, handshake_seconds, resume, str(s.ca), clients
            )
            results.handshakes.setdefault(
                f"{key}/{'on' if resume else 'off'}", []
            ).append(sample)
    last = results.handshakes
    print(
        f"tls {key}: {rps:,.0f} req/s keep-alive; handshakes per CPU-second "
        f"{last[key + '/off'][-1].per_cpu_second:,.0f} (resumption off), "
        f"{last[key + '/on'][-1].per_cpu_second:,.0f} (on, "
        f"{last[key + '/on'][-1].resumed_share:.0%} resumed)",
        flush=True,
    )


def report(results: TLSResults) -> list[str]:
    if not results.keepalive:
        return []
    lines = [
        "",
        "TLS termination (clients speak TLS to the contender):",
        "",
        "| contender | keep-alive req/s | p99 ms | p99.9 ms | CPU s / 1k req | "
        "new conns/s per core, resumption off | on | resumed | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, samples in results.keepalive.items():
        k = _median(samples)
        off = _median(results.handshakes[key + "/off"])
        on = _median(results.handshakes[key + "/on"])
        errors = (
            sum(x.errors for x in samples)
            + sum(x.errors for x in results.handshakes[key + "/off"])
            + sum(x.errors for x in results.handshakes[key + "/on"])
        )
        lines.append(
            f"| {CONTENDERS[key][0]} | {k['rps']:,.0f} | {k['p99_ms']:.2f} | "
            f"{k['p999_ms']:.2f} | {k['cpu_per_1k']:.3f} | "
            f"{off['per_cpu_second']:,.0f} | {on['per_cpu_second']:,.0f} | "
            f"{on['resumed_share']:.0%} | {errors} |"
        )
    return lines
