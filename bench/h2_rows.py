"""
HTTP/2 rows: ``h2load -c 64 -m 10`` over TLS (ALPN h2) against clerkproxy
(``--tls-cert``; HTTP/2 is on by default) and against nginx with Clerk's
recipe plus ``http2`` on its ``listen ... ssl`` port.

Figures: requests per second, mean time per request (h2load reports no
percentiles), the contender's CPU seconds per 1,000 requests, and failures.  The
report also gives clerkproxy's HTTP/2 figure over its own HTTP/1.1-over-TLS
one (from tls_rows, same run) and over nginx's HTTP/2 figure.
"""

from __future__ import annotations

import multiprocessing
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import run as harness

H2_PORT = 8804
#: Streams in flight per connection (h2load -m).
STREAMS = 10


@dataclass
class H2Sample:
    rps: float
    mean_ms: float
    cpu_per_1k: float
    failed: int


@dataclass
class RapidResetSample:
    """An ordinary client's requests while another loops Rapid Reset."""

    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    attack_streams: int
    attack_connections: int


@dataclass
class H2Results:
    samples: dict[str, list[H2Sample]] = field(default_factory=dict)
    skipped: str | None = None
    rapid_reset: RapidResetSample | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "rapid_reset": asdict(self.rapid_reset) if self.rapid_reset else None,
            "contenders": {
                k: {"samples": [asdict(x) for x in v], "median": _median(v)}
                for k, v in self.samples.items()
            },
        }


def _median(samples: list[H2Sample]) -> dict[str, float]:
    return {
        n: statistics.median(getattr(x, n) for x in samples) for n in asdict(samples[0])
    }


def _nginx_version() -> tuple[int, ...]:
    text = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in found.groups()) if found else (0,)


def nginx_recipe_h2(s: harness.Setup, port: int) -> subprocess.Popen[bytes]:
    """Clerk's nginx recipe (as in run.py) on ``listen ... ssl`` with HTTP/2."""
    if _nginx_version() >= (1, 25, 1):
        listen, directive = "ssl", "http2 on;"
    else:
        listen, directive = "ssl http2", ""
    server = f"""
    server {{
        listen 127.0.0.1:{port} {listen} backlog=1024;
        {directive}
        ssl_certificate {s.cert}; ssl_certificate_key {s.key};
        client_max_body_size 0;
        {harness.recipe_location()}
    }}"""
    return harness.start_nginx(harness.nginx_conf(s.work, "nginx-recipe-h2", server))


def clerkproxy_h2(s: harness.Setup, port: int) -> subprocess.Popen[bytes]:
    import tls_rows

    return tls_rows.clerkproxy_tls(s, port)


CONTENDERS: dict[str, tuple[str, Callable[[harness.Setup, int], Any]]] = {
    "clerkproxy": ("clerkproxy --tls-cert (HTTP/2)", clerkproxy_h2),
    "nginx-recipe": ("nginx (Clerk's recipe, listen ssl, http2 on)", nginx_recipe_h2),
}


def run_h2load(
    port: int, seconds: float, connections: int, warmup: float
) -> tuple[float, float, int, int]:
    """req/s, mean ms per request, requests done, requests failed."""
    result = subprocess.run(
        [
            "h2load",
            "-c",
            str(connections),
            "-m",
            str(STREAMS),
            "-t",
            "1",
            "-D",
            f"{int(seconds * 1000)}ms",
            "--warm-up-time",
            f"{int(warmup * 1000)}ms",
            f"https://localhost:{port}{harness.TARGET}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + warmup + 120,
    )
    out = result.stdout
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    counts = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed",
        out,
    )
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\b", out)
    if rate is None or counts is None or "Application protocol: h2" not in out:
        raise RuntimeError(f"h2load failed: {out[-800:]} {result.stderr[-400:]}")
    mean_ms = 0.0
    if mean is not None:
        mean_ms = (
            float(mean.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[mean.group(2)]
        )
    done, succeeded = int(counts.group(1)), int(counts.group(2))
    return float(rate.group(1)), mean_ms, done, done - succeeded + int(counts.group(3))


def one_round(
    s: harness.Setup,
    key: str,
    seconds: float,
    warmup: float,
    connections: int,
    results: H2Results,
) -> None:
    port = H2_PORT
    with harness.running(CONTENDERS[key][1], s, port) as process:
        cpu = harness.cpu_seconds(process.pid)
        rps, mean_ms, done, failed = run_h2load(port, seconds, connections, warmup)
        cpu = harness.cpu_seconds(process.pid) - cpu
        sample = H2Sample(rps, mean_ms, 1000 * cpu / max(done, 1), failed)
        results.samples.setdefault(key, []).append(sample)
        print(
            f"h2 {key}: {rps:,.0f} req/s, mean {mean_ms:.2f} ms, "
            f"{sample.cpu_per_1k:.3f} CPU-s/1k, {failed} failed",
            flush=True,
        )


def run_rounds(
    s: harness.Setup,
    keys: list[str],
    rounds: int,
    seconds: float,
    warmup: float,
    connections: int,
) -> H2Results:
    """The HTTP/2 rows of one benchmark run (the hook in run.py)."""
    results = H2Results()
    if shutil.which("h2load") is None:
        results.skipped = "h2load is not installed (Debian's nghttp2-client)"
        print(f"bench: HTTP/2 rows skipped: {results.skipped}", flush=True)
        return results
    for _ in range(rounds):
        for key in CONTENDERS:
            if key in keys:
                one_round(s, key, seconds, warmup, connections, results)
    if "clerkproxy" in keys:
        results.rapid_reset = rapid_reset(s, max(4 * seconds, 4.0))
    return results


def _attacker(
    port: int, seconds: float, cafile: str, out: Any
) -> None:  # pragma: no cover - runs in a child process
    """Loop HEADERS + RST_STREAM pairs; reconnect whenever refused."""
    import h2.config
    import h2.connection

    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    headers = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", harness.TARGET),
    ]
    streams = connections = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connections += 1
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                conn = h2.connection.H2Connection(
                    h2.config.H2Configuration(client_side=True)
                )
                conn.initiate_connection()
                sock.sendall(conn.data_to_send())
                sock.settimeout(0.0)
                streamID = 1
                while time.monotonic() < deadline:
                    for _ in range(50):
                        conn.send_headers(streamID, headers, end_stream=True)
                        conn.reset_stream(streamID)
                        streamID += 2
                        streams += 1
                    sock.sendall(conn.data_to_send())
                    try:
                        data = sock.recv(65536)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        continue
                    if not data:
                        break
                    conn.receive_data(data)
        except Exception:
            pass
    out.put((streams, connections))


def _probe(port: int, seconds: float, cafile: str) -> tuple[list[float], int]:
    """Ordinary HTTP/1.1 keep-alive requests over TLS, one at a time."""
    import http.client

    context = ssl.create_default_context(cafile=cafile)
    latencies: list[float] = []
    errors = 0
    conn: Any = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPSConnection(
                    "localhost", port, context=context, timeout=10
                )
            conn.request("GET", harness.TARGET)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                errors += 1
            latencies.append((time.monotonic() - started) * 1000)
        except (OSError, http.client.HTTPException):
            errors += 1
            conn = None
        time.sleep(0.01)
    return latencies, errors


def rapid_reset(s: harness.Setup, seconds: float) -> RapidResetSample:
    """One client loops Rapid Reset at clerkproxy while another is served."""
    port = H2_PORT
    with harness.running(clerkproxy_h2, s, port):
        fork = multiprocessing.get_context("fork")
        queue: Any = fork.Queue()
        attacker = fork.Process(
            target=_attacker, args=(port, seconds, str(s.ca), queue)
        )
        attacker.start()
        time.sleep(min(1.0, seconds / 4))
        latencies, errors = _probe(port, seconds * 0.7, str(s.ca))
        streams, connections = queue.get(timeout=seconds + 60)
        attacker.join()
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    sample = RapidResetSample(
        pct(0.5), pct(0.99), len(latencies), errors, streams, connections
    )
    print(
        f"h2 rapid reset: ordinary client p50 {sample.p50_ms:.1f} ms, "
        f"p99 {sample.p99_ms:.1f} ms, {errors} errors; attacker sent "
        f"{streams:,} reset streams over {connections:,} connections",
        flush=True,
    )
    return sample


def report(results: H2Results, tls: Any = None) -> list[str]:
    lines = [
        "",
        f"HTTP/2 over TLS: h2load, {STREAMS} streams per connection.",
        "",
    ]
    if results.skipped:
        return [*lines, f"(skipped: {results.skipped})"]
    lines += [
        "| contender | req/s | mean ms | CPU s / 1k req | failed |",
        "|---|---:|---:|---:|---:|",
    ]
    medians = {k: _median(v) for k, v in results.samples.items()}
    for key, m in medians.items():
        lines.append(
            f"| {CONTENDERS[key][0]} | {m['rps']:,.0f} | {m['mean_ms']:.2f} "
            f"| {m['cpu_per_1k']:.3f} | {m['failed']:.0f} |"
        )
    ours = medians.get("clerkproxy")
    if ours is not None:
        nginx = medians.get("nginx-recipe")
        if nginx is not None and nginx["rps"]:
            lines.append("")
            lines.append(
                f"clerkproxy HTTP/2 / nginx-recipe HTTP/2 = {ours['rps'] / nginx['rps']:.2f} (req/s)"
            )
        keepalive = getattr(tls, "keepalive", {}).get("clerkproxy") if tls else None
        if keepalive:
            http11 = statistics.median(x.rps for x in keepalive)
            if http11:
                lines.append(
                    f"clerkproxy HTTP/2 / clerkproxy HTTP/1.1 over TLS = {ours['rps'] / http11:.2f} (req/s)"
                )
    rr = results.rapid_reset
    if rr is not None:
        lines += [
            "",
            "Rapid Reset (CVE-2023-44487): one client loops HEADERS + RST_STREAM "
            "over HTTP/2 (reconnecting after each GOAWAY) while another makes "
            "ordinary HTTP/1.1 requests over TLS, one at a time.",
            "",
            "| ordinary p50 ms | p99 ms | requests | errors | reset streams sent | attack connections |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {rr.p50_ms:.1f} | {rr.p99_ms:.1f} | {rr.requests} | {rr.errors} "
            f"| {rr.attack_streams:,} | {rr.attack_connections:,} |",
        ]
    return lines
