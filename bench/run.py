"""
The clerkproxy benchmark: the same TLS upstream behind every contender, on
loopback, runs interleaved round by round, medians reported.

Run it through ``bash bench/run`` (which installs nginx, wrk and a venv);
``bash bench/run --help`` lists the knobs.  Figures are only comparable
within one run: the table is for ratios, not for absolute claims.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SECRET = "sk_live_" + "bench" * 8
PROXY_URL = "https://bench.test/__clerk"
UPSTREAM_PORT = 9443
STATUS_PORT = 9080
SLOW_UPSTREAM_PORT = 9444
PROXY_PORT = 8801
PROXY_TLS_PORT = 8802
TARGET = "/__clerk/v1/client?__clerk_api_version=2025-04-10&_clerk_js_version=5.0.0"
# About the size of a signed-out /v1/client answer.
CLIENT_JSON = (
    '{"response":{"object":"client","id":"client_2abc","sessions":[],'
    '"sign_up":null,"sign_in":null,"last_active_session_id":null,'
    '"cookie_expires_at":null,"created_at":1700000000000,'
    '"updated_at":1700000000000},"client":null}'
)

# --------------------------------------------------------------------------
# processes and /proc


def wait_port(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def wait_port_free(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            time.sleep(0.05)
        except OSError:
            return


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def memory_kib(pid: int, key: str) -> int:
    """Sum of a /proc status field (VmRSS, VmHWM) over the process tree."""
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stop(process: subprocess.Popen[bytes], seconds: float = 15.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running(
    start: Callable[[Setup, int], subprocess.Popen[bytes]], s: Setup, port: int
) -> Iterator[subprocess.Popen[bytes]]:
    """A contender started on C{port} (once the port is free) and listening;
    stopped on the way out."""
    wait_port_free(port)
    process = start(s, port)
    try:
        wait_port(port)
        yield process
    finally:
        stop(process)


# --------------------------------------------------------------------------
# the upstream and the contenders


@dataclass
class Setup:
    work: Path
    ca: Path
    cert: Path
    key: Path
    big: Path
    big_size: int


def make_setup(work: Path, big_size: int) -> Setup:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = Setup(
        work,
        work / "ca.pem",
        work / "cert.pem",
        work / "key.pem",
        work / "big.bin",
        big_size,
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    leaf.private_key_pem.write_to_path(str(paths.key))
    paths.cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    with open(paths.big, "wb") as f:
        f.truncate(big_size)
    # nginx's workers run as an unprivileged user: let them read these.
    work.chmod(0o755)
    for path in (paths.cert, paths.key, paths.big):
        path.chmod(0o644)
    return paths


def nginx_conf(work: Path, name: str, server: str, events: int = 20000) -> Path:
    conf = work / f"{name}.conf"
    conf.write_text(
        f"""
worker_processes 1;
pid {work}/{name}.pid;
error_log {work}/{name}.error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections {events}; }}
http {{
    access_log off;
    client_body_temp_path {work}/{name}-body;
    proxy_temp_path {work}/{name}-proxy;
    fastcgi_temp_path {work}/{name}-fastcgi;
    uwsgi_temp_path {work}/{name}-uwsgi;
    scgi_temp_path {work}/{name}-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    {server}
}}
"""
    )
    return conf


def start_nginx(conf: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(conf.parent), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=raise_fd_limit,
    )


def start_upstream(s: Setup) -> subprocess.Popen[bytes]:
    server = f"""
    server {{
        listen 127.0.0.1:{UPSTREAM_PORT} ssl;
        ssl_certificate {s.cert};
        ssl_certificate_key {s.key};
        client_max_body_size 0;
        location /big {{ alias {s.big}; }}
        location / {{
            default_type application/json;
            return 200 '{CLIENT_JSON}';
        }}
    }}
    server {{
        listen 127.0.0.1:{STATUS_PORT};
        location /status {{ stub_status; }}
    }}
"""
    process = start_nginx(nginx_conf(s.work, "upstream", server))
    wait_port(UPSTREAM_PORT)
    wait_port(STATUS_PORT)
    return process


def upstream_accepts() -> int:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{STATUS_PORT}/status", timeout=5
    ) as r:
        text = r.read().decode()
    return int(text.splitlines()[2].split()[0])


@dataclass
class Contender:
    name: str
    start: Callable[[Setup, int], subprocess.Popen[bytes]]


def proxy_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CLERK_SECRET_KEY"] = SECRET
    env["CLERK_PROXY_URL"] = PROXY_URL
    return env


def python_contender(
    script: str, *args: Callable[[Setup], str]
) -> Callable[[Setup, int], subprocess.Popen[bytes]]:
    def start(s: Setup, port: int) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            str(HERE / "contenders" / script),
            str(port),
            *[a(s) for a in args],
        ]
        return subprocess.Popen(
            argv,
            env=proxy_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=raise_fd_limit,
        )

    return start


def clerkproxy_argv(s: Setup, extra: list[str], fapi: str | None = None) -> list[str]:
    return [
        str(BIN / "twistd"),
        "-n",
        "--pidfile=",
        "--logfile=" + str(s.work / "clerkproxy.log"),
        "clerkproxy",
        "--proxy-url",
        PROXY_URL,
        "--fapi",
        fapi or f"https://localhost:{UPSTREAM_PORT}",
        "--fapi-ca",
        str(s.ca),
        *extra,
    ]


def clerkproxy(workers: int = 1) -> Callable[[Setup, int], subprocess.Popen[bytes]]:
    def start(s: Setup, port: int) -> subprocess.Popen[bytes]:
        extra = ["--port", f"tcp:{port}:interface=127.0.0.1:backlog=1024"]
        if workers > 1:
            extra += ["--workers", str(workers)]
        return subprocess.Popen(
            clerkproxy_argv(s, extra),
            env=proxy_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=raise_fd_limit,
        )

    return start


def recipe_location(upstream_port: int = UPSTREAM_PORT, extra: str = "") -> str:
    """The C{location} block of Clerk's nginx guide, with only the host and
    key filled in (and C{extra} directives appended)."""
    return f"""
            location /__clerk/ {{
                rewrite ^/__clerk/(.*)$ /$1 break;
                proxy_pass https://localhost:{upstream_port};
                proxy_set_header Clerk-Proxy-Url {PROXY_URL};
                proxy_set_header Clerk-Secret-Key {SECRET};
                proxy_set_header X-Forwarded-For $remote_addr;
                proxy_redirect off;
                {extra}
            }}"""


def nginx_contender(
    tuned: bool, listen_ssl: bool = False
) -> Callable[[Setup, int], subprocess.Popen[bytes]]:
    def start(s: Setup, port: int) -> subprocess.Popen[bytes]:
        if tuned:
            upstream = f"upstream fapi {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 128; keepalive_requests 1000000; }}"
            location = f"""
            location /__clerk/ {{
                rewrite ^/__clerk/(.*)$ /$1 break;
                proxy_pass https://fapi;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header Host localhost;
                proxy_ssl_server_name on;
                proxy_ssl_name localhost;
                proxy_set_header Clerk-Proxy-Url {PROXY_URL};
                proxy_set_header Clerk-Secret-Key {SECRET};
                proxy_set_header X-Forwarded-For $remote_addr;
                proxy_redirect off;
            }}"""
        else:
            upstream = ""
            location = recipe_location()
        name = ("nginx-tuned" if tuned else "nginx-recipe") + (
            "-ssl" if listen_ssl else ""
        )
        # With ssl: the recipe's server block with "listen ... ssl" and a
        # certificate, nothing else (nginx resumes by ticket by default).
        tls = (
            f"ssl_certificate {s.cert}; ssl_certificate_key {s.key};"
            if listen_ssl
            else ""
        )
        server = f"""
        {upstream}
        server {{
            listen 127.0.0.1:{port} {"ssl " if listen_ssl else ""}backlog=1024;
            {tls}
            client_max_body_size 0;
            {location}
        }}"""
        return start_nginx(nginx_conf(s.work, name, server))

    return start


CONTENDERS = {
    "clerkproxy": Contender("clerkproxy", clerkproxy()),
    "clerkproxy-2w": Contender("clerkproxy --workers 2", clerkproxy(2)),
    "nginx-recipe": Contender("nginx (Clerk's recipe)", nginx_contender(False)),
    "nginx-tuned": Contender(
        "nginx (tuned, upstream keepalive)", nginx_contender(True)
    ),
    "aiohttp": Contender(
        "aiohttp proxy",
        python_contender(
            "aiohttp_proxy.py",
            lambda s: f"https://localhost:{UPSTREAM_PORT}",
            lambda s: str(s.ca),
        ),
    ),
    "twisted-agent": Contender(
        "Twisted Agent (textbook)",
        python_contender(
            "twisted_agent.py",
            lambda s: f"https://localhost:{UPSTREAM_PORT}",
            lambda s: str(s.ca),
        ),
    ),
    "clerkway": Contender(
        "clerkway (FastAPI + httpx, uvicorn)",
        python_contender(
            "clerkway_proxy.py",
            lambda s: f"https://localhost:{UPSTREAM_PORT}",
            lambda s: str(s.ca),
        ),
    ),
    "twisted-stock": Contender(
        "Twisted ReverseProxyResource",
        python_contender(
            "twisted_stock.py",
            lambda s: "localhost",
            lambda s: str(UPSTREAM_PORT),
            lambda s: str(s.ca),
        ),
    ),
}

# --------------------------------------------------------------------------
# throughput rounds


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    cpu_per_1k: float
    peak_rss_mib: float
    new_upstream_per_1k: float
    errors: int


@dataclass
class Results:
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    memory: list[tuple[str, str]] = field(default_factory=list)
    #: The same figures as numbers, for the JSON: label -> (value, unit).
    memory_values: dict[str, tuple[float, str]] = field(default_factory=dict)
    #: RSS (KiB) of each contender against idle keep-alive connections held.
    idle_curves: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    tls: Any = None
    http2: Any = None  # bench/h2_rows.py


def parse_duration_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(
    port: int, seconds: float, connections: int, scheme: str = "http"
) -> tuple[float, float, float, float, int, int]:
    """(req/s, p50 ms, p99 ms, p99.9 ms, requests, errors) of one wrk run."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(HERE / "latency.lua"),
            f"{scheme}://127.0.0.1:{port}{TARGET}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = parse_duration_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = parse_duration_ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p999 = int(re.search(r"P99\.9 (\d+)", out).group(1)) / 1000  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        errors += sum(int(g) for g in m.groups())
    return rps, p50, p99, p999, total, errors


def check_answer(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{TARGET}", timeout=10) as r:
        body = r.read()
    if r.status != 200 or b'"object":"client"' not in body:
        raise RuntimeError(f"contender on {port} answered {r.status}: {body[:200]!r}")


def one_sample(
    contender: Contender, s: Setup, seconds: float, warmup: float, connections: int
) -> Sample:
    port = PROXY_PORT
    with running(contender.start, s, port) as process:
        check_answer(port)
        run_wrk(port, warmup, connections)
        accepts = upstream_accepts()
        cpu = cpu_seconds(process.pid)
        rps, p50, p99, p999, total, errors = run_wrk(port, seconds, connections)
        cpu = cpu_seconds(process.pid) - cpu
        opened = upstream_accepts() - accepts - 1  # the status request itself
        peak = memory_kib(process.pid, "VmHWM") / 1024
    return Sample(
        rps,
        p50,
        p99,
        p999,
        1000 * cpu / max(total, 1),
        peak,
        1000 * max(opened, 0) / max(total, 1),
        errors,
    )


# --------------------------------------------------------------------------
# memory: idle connections, streaming


async def _hold_connections(
    port: int, count: int, tls: ssl.SSLContext | None
) -> list[asyncio.StreamWriter]:
    request = f"GET {TARGET} HTTP/1.1\r\nHost: bench.test\r\n\r\n".encode()
    writers: list[asyncio.StreamWriter] = []
    semaphore = asyncio.Semaphore(200)

    async def one() -> None:
        async with semaphore:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
            )
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


IDLE_STEPS = 5
#: Seconds to let the process settle before reading its RSS (less in --quick).
IDLE_SETTLE = 1.0


def idle_curve(
    process: subprocess.Popen[bytes],
    port: int,
    count: int,
    context: ssl.SSLContext | None,
) -> list[tuple[int, int]]:
    """
    (idle keep-alive connections held, RSS KiB) as C{count} connections,
    each after one request, are added in L{IDLE_STEPS} batches.
    """

    async def measure() -> list[tuple[int, int]]:
        await _hold_connections(port, 50, context)  # warm caches and the pool
        await asyncio.sleep(0.5)
        curve = [(0, memory_kib(process.pid, "VmRSS"))]
        writers: list[asyncio.StreamWriter] = []
        for step in range(1, IDLE_STEPS + 1):
            batch = count * step // IDLE_STEPS - len(writers)
            writers += await _hold_connections(port, batch, context)
            await asyncio.sleep(IDLE_SETTLE)
            curve.append((len(writers), memory_kib(process.pid, "VmRSS")))
        for w in writers:
            w.transport.abort()
        return curve

    return asyncio.run(measure())


def idle_connection_cost(
    s: Setup, count: int, tls: bool, curves: dict[str, list[tuple[int, int]]]
) -> float:
    """KiB of proxy RSS added per idle keep-alive connection (after one request)."""
    port = PROXY_TLS_PORT if tls else PROXY_PORT
    wait_port_free(port)
    extra = (
        ["--port", str(port), "--tls-cert", str(s.cert), "--tls-key", str(s.key)]
        if tls
        else ["--port", f"tcp:{port}:interface=127.0.0.1:backlog=4096"]
    )
    process = subprocess.Popen(
        clerkproxy_argv(s, extra),
        env=proxy_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=raise_fd_limit,
    )
    context = None
    if tls:
        context = ssl.create_default_context(cafile=str(s.ca))
    try:
        wait_port(port)
        curve = idle_curve(process, port, count, context)
    finally:
        stop(process)
    curves["clerkproxy --tls-cert" if tls else "clerkproxy"] = curve
    return (curve[-1][1] - curve[0][1]) / count


#: Contenders whose memory against idle plain connections is charted too.
IDLE_OTHERS = ("nginx-recipe", "aiohttp", "clerkway")


def idle_contender_curve(s: Setup, key: str, count: int) -> list[tuple[int, int]]:
    port = PROXY_PORT
    with running(CONTENDERS[key].start, s, port) as process:
        check_answer(port)
        return idle_curve(process, port, count, None)


async def _slow_read(reader: asyncio.StreamReader, total: int, rate: float) -> int:
    got, started = 0, time.monotonic()
    while got < total:
        chunk = await reader.read(min(65536, total - got))
        if not chunk:
            break
        got += len(chunk)
        ahead = got / rate - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)
    return got


def sample_rss(pid: int, stop_event: list[bool], peaks: list[int]) -> None:
    while not stop_event:
        peaks.append(memory_kib(pid, "VmRSS"))
        time.sleep(0.1)


async def _slow_upstream(rate: float) -> asyncio.base_events.Server:
    """A TLS upstream that reads request bodies at C{rate} bytes/s."""

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (
                asyncio.IncompleteReadError,
                ConnectionError,
                asyncio.CancelledError,
            ):
                break  # the proxy closed its pooled connection, or we are done
            m = re.search(rb"Content-Length: (\d+)", head, re.I)
            length = int(m.group(1)) if m else 0
            got = await _slow_read(reader, length, rate)
            body = f'{{"received":{got}}}'.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()
        writer.close()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(_SETUP.cert, _SETUP.key)  # type: ignore[union-attr]
    return await asyncio.start_server(
        handle, "127.0.0.1", SLOW_UPSTREAM_PORT, ssl=context
    )


_SETUP: Setup | None = None


def streaming_growth(
    s: Setup, direction: str, size: int, rate: float
) -> tuple[float, float]:
    """(RSS growth in MiB, seconds) while moving C{size} bytes through the proxy."""
    port = PROXY_PORT
    wait_port_free(port)
    uploading = direction != "download"
    fapi = f"https://localhost:{SLOW_UPSTREAM_PORT}" if uploading else None
    extra = [
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--max-body-size",
        str(size + 1),
    ]
    process = subprocess.Popen(
        clerkproxy_argv(s, extra, fapi),
        env=proxy_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=raise_fd_limit,
    )
    try:
        wait_port(port)

        async def move() -> tuple[float, float]:
            # "upload": a fast client and an upstream reading at C{rate};
            # "slow-writer": a client writing at C{rate} to a fast upstream.
            upstream_rate = rate if direction == "upload" else 1e12
            server = await _slow_upstream(upstream_rate) if uploading else None
            # Settle: one small exchange first, so the pool and TLS state exist.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET {TARGET} HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n".encode()
            )
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.abort()
            await asyncio.sleep(0.5)
            baseline = memory_kib(process.pid, "VmRSS")
            peaks: list[int] = []
            done: list[bool] = []
            loop = asyncio.get_running_loop()
            sampler = loop.run_in_executor(None, sample_rss, process.pid, done, peaks)
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if direction == "download":
                writer.write(
                    b"GET /__clerk/big HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                await reader.readuntil(b"\r\n\r\n")
                got = await _slow_read(reader, size, rate)
            else:
                writer.write(
                    f"POST /__clerk/v1/me/profile_image HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n".encode()
                )
                chunk = b"u" * 262144
                left = size
                while left:
                    n = min(len(chunk), left)
                    writer.write(chunk[:n])
                    left -= n
                    await writer.drain()
                    if direction == "slow-writer":
                        ahead = (size - left) / rate - (time.monotonic() - started)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                await reader.readuntil(b"\r\n\r\n")
                body = await reader.read()
                got = int(re.search(rb'"received":(\d+)', body).group(1))  # type: ignore[union-attr]
            elapsed = time.monotonic() - started
            writer.transport.abort()
            done.append(True)
            await sampler
            if server is not None:
                server.close()
            if got != size:
                raise RuntimeError(f"{direction}: moved {got} of {size} bytes")
            return (max(peaks) - baseline) / 1024, elapsed

        return asyncio.run(move())
    finally:
        stop(process)


# --------------------------------------------------------------------------
# report


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    nginx = subprocess.run(
        ["nginx", "-v"], capture_output=True, text=True
    ).stderr.strip()
    wrk = subprocess.run(
        ["wrk", "-v"], capture_output=True, text=True
    ).stdout.splitlines()[0]
    import twisted

    return (
        f"{os.cpu_count()} CPUs ({cpu}), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
        f"Linux {platform.release()}, Python {platform.python_version()}, Twisted {twisted.__version__}, "
        f"{nginx.replace('nginx version: ', '')}, {wrk.split(' [')[0]}"
    )


def sample_medians(results: Results) -> dict[str, dict[str, float]]:
    medians: dict[str, dict[str, float]] = {}
    for key, samples in results.samples.items():
        m = {
            name: statistics.median(getattr(x, name) for x in samples)
            for name in (
                "rps",
                "p50_ms",
                "p99_ms",
                "p999_ms",
                "cpu_per_1k",
                "peak_rss_mib",
                "new_upstream_per_1k",
            )
        }
        m["errors"] = sum(x.errors for x in samples)
        medians[key] = m
    return medians


def report(results: Results, args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {machine()}",
        "",
        f"{args.rounds} interleaved rounds, {args.duration:g} s each, wrk -t1 -c{args.connections}, "
        "medians. Upstream: nginx over TLS on loopback, sharing the cores.",
        "",
        "| contender | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 1k req | peak RSS MiB | new upstream conns / 1k req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    medians = sample_medians(results)
    for key, m in medians.items():
        lines.append(
            f"| {CONTENDERS[key].name} | {m['rps']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
            f"{m['p999_ms']:.2f} | {m['cpu_per_1k']:.3f} | {m['peak_rss_mib']:.1f} | {m['new_upstream_per_1k']:.2f} | {m['errors']:.0f} |"
        )
    lines.append("")
    if "clerkproxy" in medians:
        ours = medians["clerkproxy"]
        for key, m in medians.items():
            if key != "clerkproxy":
                lines.append(f"clerkproxy/{key} = {ours['rps'] / m['rps']:.2f} (req/s)")
        for key, m in medians.items():
            if key != "clerkproxy":
                lines.append(
                    f"clerkproxy/{key} = {ours['cpu_per_1k'] / m['cpu_per_1k']:.2f} (CPU per request)"
                )
        if "nginx-recipe" in medians:
            lines.append(
                f"clerkproxy/nginx-recipe p99 = {ours['p99_ms'] / medians['nginx-recipe']['p99_ms']:.2f}"
            )
        if "aiohttp" in medians:
            lines.append(
                f"clerkproxy/aiohttp p99 = {ours['p99_ms'] / medians['aiohttp']['p99_ms']:.2f}"
            )
        if "clerkproxy-2w" in medians:
            lines.append(
                f"clerkproxy-2w/nginx-recipe = {medians['clerkproxy-2w']['rps'] / medians.get('nginx-recipe', {'rps': float('nan')})['rps']:.2f} (req/s)"
            )
    if results.tls is not None:
        import tls_rows

        lines += tls_rows.report(results.tls)
    if results.http2 is not None:
        import h2_rows

        lines += h2_rows.report(results.http2, results.tls)
    if results.memory:
        lines += ["", "| clerkproxy memory | result |", "|---|---:|"]
        lines += [f"| {what} | {value} |" for what, value in results.memory]
    return "\n".join(lines)


def write_json(results: Results, args: argparse.Namespace, path: Path) -> None:
    """Everything the Markdown report says, as data (for bench/charts.py)."""
    import json

    medians = sample_medians(results)
    data = {
        "machine": machine(),
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "connections": args.connections,
            "idle": args.idle,
            "quick": args.quick,
        },
        "contenders": {
            key: {
                "name": CONTENDERS[key].name,
                "median": medians[key],
                "samples": [asdict(x) for x in samples],
            }
            for key, samples in results.samples.items()
        },
        "memory": {
            label: {"value": value, "unit": unit}
            for label, (value, unit) in results.memory_values.items()
        },
        "idle_curves": {
            name: [{"connections": n, "rss_kib": rss} for n, rss in curve]
            for name, curve in results.idle_curves.items()
        },
        "tls": results.tls.as_json() if results.tls is not None else None,
        "http2": results.http2.as_json() if results.http2 is not None else None,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of load per sample"
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--only", default=",".join(CONTENDERS), help="comma-separated contenders"
    )
    parser.add_argument(
        "--idle",
        type=int,
        default=10000,
        help="idle connections for the RSS test (0 skips)",
    )
    parser.add_argument(
        "--stream-size",
        type=int,
        default=1 << 30,
        help="bytes per streaming test (0 skips)",
    )
    parser.add_argument(
        "--stream-rate", type=float, default=128e6, help="slow peer's bytes/s"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: tiny and fast"
    )
    parser.add_argument("--output", type=Path, default=HERE / "results" / "latest.md")
    parser.add_argument(
        "--no-tls",
        dest="tls",
        action="store_false",
        help="skip the TLS termination rows",
    )
    parser.add_argument(
        "--no-http2",
        dest="http2",
        action="store_false",
        help="skip the HTTP/2 rows (h2load -c CONNECTIONS -m 10 over TLS)",
    )
    parser.add_argument(
        "--handshake-seconds",
        type=float,
        default=10.0,
        help="seconds of close-after-each-request clients per TLS handshake sample",
    )
    parser.add_argument(
        "--charts",
        type=Path,
        default=None,
        help="where bench/charts.py writes its PNGs (default: docs/ for a full "
        "run with the default --output, else beside --output)",
    )
    import scenarios  # bench/scenarios.py: the hostile-client scenarios

    scenarios.add_arguments(parser)
    args = parser.parse_args()
    if args.scenario:
        return scenarios.run(parser, args)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1.0, 0.5
        args.idle, args.stream_size = 200, 8 << 20
        args.handshake_seconds = 1.0
        global IDLE_SETTLE
        IDLE_SETTLE = 0.2
    if args.charts is None:
        default = args.output == parser.get_default("output") and not args.quick
        args.charts = HERE.parent / "docs" if default else args.output.parent
    raise_fd_limit()
    keys = [k for k in args.only.split(",") if k]
    for key in keys:
        if key not in CONTENDERS:
            parser.error(
                f"unknown contender {key!r}; choose from {', '.join(CONTENDERS)}"
            )
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(
                f"bench: {tool} is not installed; run bench/run, which installs it"
            )
    work = Path(tempfile.mkdtemp(prefix="clerkproxy-bench-"))
    global _SETUP
    s = _SETUP = make_setup(work, max(args.stream_size, 1))
    upstream = start_upstream(s)
    results = Results()
    try:
        for round_ in range(args.rounds):
            for key in keys:
                sample = one_sample(
                    CONTENDERS[key], s, args.duration, args.warmup, args.connections
                )
                results.samples.setdefault(key, []).append(sample)
                print(
                    f"round {round_ + 1} {key}: {sample.rps:,.0f} req/s p99 {sample.p99_ms:.2f} ms "
                    f"new-upstream/1k {sample.new_upstream_per_1k:.2f}",
                    flush=True,
                )
        if args.tls:
            import tls_rows  # bench/tls_rows.py: clients speak TLS to the contender

            results.tls = tls_rows.TLSResults()
            for _ in range(args.rounds):
                for key in tls_rows.CONTENDERS:
                    if key in keys:
                        tls_rows.one_round(
                            s,
                            key,
                            args.duration,
                            args.warmup,
                            args.connections,
                            args.handshake_seconds,
                            2,
                            results.tls,
                        )
        if args.http2:
            import h2_rows  # bench/h2_rows.py: HTTP/2 clients over TLS

            results.http2 = h2_rows.run_rounds(
                s, keys, args.rounds, args.duration, args.warmup, args.connections
            )
        if args.idle:
            for tls in (False, True):
                cost = idle_connection_cost(s, args.idle, tls, results.idle_curves)
                label = f"RSS per idle keep-alive {'TLS' if tls else 'plain'} client connection ({args.idle:,} connections)"
                results.memory.append((label, f"{cost:.1f} KiB"))
                results.memory_values[label] = (cost, "KiB")
                print(label, f"{cost:.1f} KiB", flush=True)
            for key in IDLE_OTHERS:
                if key in keys:
                    curve = idle_contender_curve(s, key, args.idle)
                    results.idle_curves[CONTENDERS[key].name] = curve
                    print(
                        f"idle {key}: {(curve[-1][1] - curve[0][1]) / args.idle:.1f} KiB per connection",
                        flush=True,
                    )
        if args.stream_size:
            for direction in ("download", "upload", "slow-writer"):
                growth, seconds = streaming_growth(
                    s, direction, args.stream_size, args.stream_rate
                )
                peer = {
                    "download": "download to a slow reader",
                    "upload": "upload to a slow upstream reader",
                    "slow-writer": "upload from a slow writer",
                }[direction]
                label = f"RSS growth streaming {args.stream_size / 2**30:.3g} GiB {peer} ({args.stream_rate / 1e6:.0f} MB/s, {seconds:.1f} s)"
                results.memory.append((label, f"{growth:.1f} MiB"))
                results.memory_values[label] = (growth, "MiB")
                print(label, f"{growth:.1f} MiB", flush=True)
    finally:
        stop(upstream)
        shutil.rmtree(work, ignore_errors=True)
    text = report(results, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    data = args.output.with_suffix(".json")
    write_json(results, args, data)
    import charts  # bench/charts.py

    drawn = charts.render(data, args.charts)
    print()
    print(text)
    print()
    print(
        f"bench: wrote {args.output}, {data} and {len(drawn)} charts in {args.charts}"
    )


if __name__ == "__main__":
    main()
