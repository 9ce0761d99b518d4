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

import re
import shutil
import statistics
import subprocess
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
class H2Results:
    samples: dict[str, list[H2Sample]] = field(default_factory=dict)
    skipped: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
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
        location /__clerk/ {{
            rewrite ^/__clerk/(.*)$ /$1 break;
            proxy_pass https://localhost:{harness.UPSTREAM_PORT};
            proxy_set_header Clerk-Proxy-Url {harness.PROXY_URL};
            proxy_set_header Clerk-Secret-Key {harness.SECRET};
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_redirect off;
        }}
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
    name, start = CONTENDERS[key]
    port = H2_PORT
    harness.wait_port_free(port)
    process = start(s, port)
    try:
        harness.wait_port(port)
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
    finally:
        harness.stop(process)


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
    return results


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
    return lines
