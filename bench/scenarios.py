"""
Hostile-client scenarios: ``bash bench/run --scenario NAME``.

Each scenario starts a contender (clerkproxy, and Clerk's nginx recipe for
comparison) in front of a stand-in FAPI, attacks it from a separate process
(``bench/attack.py``, or ``wrk`` for many-clients) and, while the attack
runs, sends ordinary ``/v1/client`` requests at a steady rate from this
process.  It reports the ordinary requests' p50, p99 and failures, the
contender's peak RSS and open file descriptors during the attack, and
whether its descriptors are back to their baseline once the attack has
stopped and the upstream pool's idle timeout has passed.

The results are a list of plain dicts: ``bench/run`` writes them as a
Markdown table and as JSON beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import run as harness

HERE = Path(__file__).resolve().parent
# The stand-in FAPI's large answer: the issue asks for at least 50 MB.
BIG_SIZE = 64 << 20
# What the stand-in answers only after reading the whole request body, as
# FAPI does for a form POST.
UPLOAD_PATH = "/__clerk/v1/client/sign_ins"
# clerkproxy's default upstream pool idle timeout (ProxyConfig.pool_idle_timeout).
POOL_IDLE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Scenario:
    name: str
    attackers: int
    quick_attackers: int
    summary: str


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "stalled-readers",
            1000,
            100,
            "each GETs a 64 MiB answer with a 4 KiB receive buffer and reads nothing",
        ),
        Scenario(
            "slow-readers",
            1000,
            100,
            "each GETs a 64 MiB answer with a 4 KiB receive buffer and reads 1 byte per interval",
        ),
        Scenario(
            "slow-uploads",
            1000,
            200,
            "each POSTs a 64 KiB body 1 byte per interval, reconnecting when cut",
        ),
        Scenario(
            "slowloris",
            1000,
            200,
            "each sends a request head 1 header line per interval, reconnecting when cut",
        ),
        Scenario(
            "many-clients",
            5000,
            1000,
            "wrk -t1 with this many keep-alive connections on /v1/client",
        ),
    )
}
CONTENDERS = ("clerkproxy", "clerkproxy-2w", "nginx-recipe")


# --------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "hostile-client scenarios (docs/performance.md)",
        "With --scenario, only the named scenarios run, against clerkproxy and "
        "nginx-recipe (clerkproxy alone with --quick) or the --only list.",
    )
    group.add_argument(
        "--scenario",
        action="append",
        default=[],
        help=f"repeatable or comma-separated: {', '.join(SCENARIOS)} or all",
    )
    group.add_argument(
        "--attackers",
        type=int,
        help="attack connections (default per scenario: 1000, many-clients 5000)",
    )
    group.add_argument(
        "--attack-duration",
        type=float,
        help="seconds of ordinary requests under attack (default 120; --quick 2)",
    )
    group.add_argument(
        "--ordinary-rate",
        type=float,
        default=10.0,
        help="ordinary requests per second, each on a new connection",
    )
    group.add_argument(
        "--ordinary-timeout",
        type=float,
        help="seconds an ordinary request may take before it counts as failed (default 40; --quick 10)",
    )
    group.add_argument(
        "--settle",
        type=float,
        help="after the attack, seconds to wait for the contender's fds to reach their baseline "
        f"(default {POOL_IDLE_TIMEOUT + 15:g}: the pool's idle timeout and a margin; --quick 1)",
    )
    group.add_argument(
        "--trickle-interval",
        type=float,
        default=1.0,
        help="seconds between a slow client's bytes or header lines",
    )
    group.add_argument(
        "--proxy-arg",
        action="append",
        default=[],
        help="an extra clerkproxy option, e.g. --proxy-arg=--send-timeout=10 (repeatable)",
    )


@dataclass(frozen=True)
class Settings:
    scenarios: list[Scenario]
    contenders: list[str]
    attackers: int | None
    duration: float
    rate: float
    timeout: float
    settle: float
    interval: float
    proxy_args: list[str]
    quick: bool


def settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    names: list[str] = []
    for item in args.scenario:
        names += [n for n in item.split(",") if n]
    if "all" in names:
        names = list(SCENARIOS)
    for name in names:
        if name not in SCENARIOS:
            parser.error(
                f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)} or all"
            )
    if args.only != parser.get_default("only"):
        contenders = [k for k in args.only.split(",") if k]
    elif args.quick:
        contenders = ["clerkproxy"]
    else:
        contenders = ["clerkproxy", "nginx-recipe"]
    for key in contenders:
        if key not in CONTENDERS:
            parser.error(
                f"contender {key!r} has no scenarios; choose from {', '.join(CONTENDERS)}"
            )

    def pick(value: float | None, full: float, quick: float) -> float:
        if value is not None:
            return value
        return quick if args.quick else full

    return Settings(
        scenarios=[SCENARIOS[n] for n in dict.fromkeys(names)],
        contenders=contenders,
        attackers=args.attackers,
        duration=pick(args.attack_duration, 120.0, 2.0),
        rate=args.ordinary_rate,
        timeout=pick(args.ordinary_timeout, 40.0, 10.0),
        settle=pick(args.settle, POOL_IDLE_TIMEOUT + 15, 1.0),
        interval=args.trickle_interval,
        proxy_args=args.proxy_arg,
        quick=args.quick,
    )


# --------------------------------------------------------------------------
# the stand-in FAPI and the contenders


@dataclass(frozen=True)
class Ports:
    """Loopback ports of one run, free when it starts: not run.py's fixed
    ones, so that a scenario run and a throughput run can share a machine."""

    upstream: int
    status: int
    proxy: int

    @classmethod
    def free(cls) -> Ports:
        sockets = [socket.socket() for _ in range(3)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        numbers = [sock.getsockname()[1] for sock in sockets]
        for sock in sockets:
            sock.close()
        return cls(*numbers)


def start_upstream(s: harness.Setup, ports: Ports) -> subprocess.Popen[bytes]:
    """The benchmark's stand-in FAPI, patient with a slow proxy.

    Like run.py's, plus: it waits up to 10 minutes for the proxy to read an
    answer or send a body (nginx's 60 s default would free pinned upstream
    connections for the proxy), and it answers L{UPLOAD_PATH} only once the
    whole request body is in (C{proxy_pass} buffers the body first).  Its
    send buffers are fixed at 128 KiB: on loopback, kernel autotuning would
    otherwise park up to 4 MiB of each large answer on the stand-in's side
    of every connection a stalled client pins, where in production that
    memory sits on FAPI's machines, and 1,000 of them push the whole host
    into TCP memory pressure.
    """
    json_body = harness.CLIENT_JSON
    server = f"""
    send_timeout 600s;
    client_body_timeout 600s;
    server {{
        listen 127.0.0.1:{ports.upstream} ssl sndbuf=128k;
        ssl_certificate {s.cert};
        ssl_certificate_key {s.key};
        client_max_body_size 0;
        location /big {{ alias {s.big}; }}
        location /v1/client/sign_ins {{
            proxy_pass http://127.0.0.1:{ports.status}/json;
        }}
        location / {{
            default_type application/json;
            return 200 '{json_body}';
        }}
    }}
    server {{
        listen 127.0.0.1:{ports.status};
        location /status {{ stub_status; }}
        location /json {{
            default_type application/json;
            return 200 '{json_body}';
        }}
    }}
"""
    process = harness.start_nginx(harness.nginx_conf(s.work, "upstream", server))
    harness.wait_port(ports.upstream)
    harness.wait_port(ports.status)
    return process


def start_clerkproxy(
    s: harness.Setup, ports: Ports, log: Path, workers: int, extra: list[str]
) -> subprocess.Popen[bytes]:
    options = [
        "--port",
        f"tcp:{ports.proxy}:interface=127.0.0.1:backlog=4096",
        "--drain-timeout",
        "2",
    ]
    if workers > 1:
        options += ["--workers", str(workers)]
    argv = [
        "--logfile=" + str(log) if a.startswith("--logfile=") else a
        for a in harness.clerkproxy_argv(
            s, options + extra, f"https://localhost:{ports.upstream}"
        )
    ]
    return subprocess.Popen(
        argv,
        env=harness.proxy_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=harness.raise_fd_limit,
    )


def start_nginx_recipe(s: harness.Setup, ports: Ports) -> subprocess.Popen[bytes]:
    """Clerk's nginx recipe as run.py has it, with C{proxy_max_temp_file_size 0}:
    by default nginx spools up to 1 GiB of each answer a client is slow to
    take to a temporary file, which for 1,000 stalled readers of a 64 MiB
    answer means 64 GB of disk.  With 0 it keeps its in-memory buffers and,
    like clerkproxy, leaves the rest in the upstream connection."""
    server = f"""
    server {{
        listen 127.0.0.1:{ports.proxy} backlog=4096;
        client_max_body_size 0;
        {harness.recipe_location(ports.upstream, "proxy_max_temp_file_size 0;")}
    }}"""
    return harness.start_nginx(harness.nginx_conf(s.work, "nginx-recipe", server))


# --------------------------------------------------------------------------
# /proc


def open_fds(pid: int) -> int:
    """Open file descriptors of a process and its descendants."""
    total = 0
    for p in harness.descendants(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return total


def tcp_kernel_mib() -> float:
    """Memory in every TCP socket buffer on the machine (/proc/net/sockstat)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return (
                int(fields[fields.index("mem") + 1])
                * os.sysconf("SC_PAGE_SIZE")
                / 2**20
            )
    return 0.0


class Sampler:
    """Peak fds and RSS of a process tree, and the machine's TCP buffer
    memory, sampled every 0.2 s in a thread (so that reading /proc does not
    delay the ordinary client)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_fds = open_fds(pid)
        self.peak_rss = harness.memory_kib(pid, "VmRSS")
        self.peak_tcp = self.baseline_tcp = tcp_kernel_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_fds = max(self.peak_fds, open_fds(self.pid))
            self.peak_rss = max(self.peak_rss, harness.memory_kib(self.pid, "VmRSS"))
            self.peak_tcp = max(self.peak_tcp, tcp_kernel_mib())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        # VmHWM catches a peak between two samples.
        self.peak_rss = max(self.peak_rss, harness.memory_kib(self.pid, "VmHWM"))


# --------------------------------------------------------------------------
# the ordinary client


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def ordinary_requests(
    port: int, duration: float, rate: float, timeout: float
) -> dict[str, Any]:
    """Send C{rate} requests a second for C{duration} seconds, each on a new
    connection and without waiting for earlier ones (so a stuck proxy cannot
    slow the sending down), then wait for them all, each at most
    C{timeout} seconds.  Latencies include failed requests."""
    request = (
        f"GET {harness.TARGET} HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    slowest: dict[int, float] = {}  # the slowest latency by second sent
    statuses: Counter[int] = Counter()
    failures: Counter[str] = Counter()

    async def exchange() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            while await reader.read(65536):
                pass
        finally:
            writer.transport.abort()
        return int(head.split(b" ", 2)[1])

    async def one(second: int) -> None:
        started = time.monotonic()
        try:
            status = await asyncio.wait_for(exchange(), timeout)
        except asyncio.TimeoutError:
            failures["timeout"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            failures["connection"] += 1
        except (ValueError, IndexError):
            failures["bad response"] += 1
        else:
            statuses[status] += 1
        latencies.append(time.monotonic() - started)
        slowest[second] = max(slowest.get(second, 0.0), latencies[-1])

    tasks = []
    started = time.monotonic()
    for n in range(max(1, round(duration * rate))):
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(int(n / rate))))
    await asyncio.gather(*tasks)
    latencies_ms = [x * 1000 for x in latencies]
    return {
        "requests": len(tasks),
        "p50_ms": round(percentile(latencies_ms, 50), 2),
        "p99_ms": round(percentile(latencies_ms, 99), 2),
        "max_ms": round(max(latencies_ms), 2),
        "5xx": sum(n for code, n in statuses.items() if code >= 500),
        "no_answer": sum(failures.values()),
        "statuses": {str(code): n for code, n in sorted(statuses.items())},
        "failures": dict(failures),
        "slowest_ms_by_second": [round(slowest[k] * 1000, 1) for k in sorted(slowest)],
    }


# --------------------------------------------------------------------------
# attackers


class Attack:
    """A running attack: start(), ready(), stop() -> counts."""

    argv: list[str]
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start C{argv} in its own process group, stdin and stdout piped."""
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=harness.raise_fd_limit,
        )

    async def ready(self) -> dict[str, Any]:
        raise NotImplementedError

    async def finish(self) -> dict[str, Any]:
        raise NotImplementedError

    async def stop(self) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.finish(), 20)
        except asyncio.TimeoutError:
            return {"error": "the attack did not stop within 20 s; killed"}
        finally:
            self.kill()

    def kill(self) -> None:
        """Kill the attack's process group, unless it has been reaped."""
        if self.process is None or self.process.returncode is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def reap(self) -> None:
        """Kill and wait for the attack, if it still runs."""
        if self.process is not None and self.process.returncode is None:
            self.kill()
            await self.process.wait()


class ClientAttack(Attack):
    """bench/attack.py in its own process group."""

    def __init__(self, kind: str, port: int, count: int, interval: float) -> None:
        path = UPLOAD_PATH if kind == "slow-uploads" else "/__clerk/big"
        if kind == "slowloris":
            path = harness.TARGET
        self.argv = [
            sys.executable,
            str(HERE / "attack.py"),
            kind,
            "--port",
            str(port),
            "--count",
            str(count),
            "--interval",
            str(interval),
            "--path",
            path,
            # A bound on its own, should this process never close its stdin.
            "--hold",
            "3600",
        ]

    async def _line(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError("the attack process ended early")
        record: dict[str, Any] = json.loads(line)
        return record

    async def ready(self) -> dict[str, Any]:
        return await asyncio.wait_for(self._line(), 120)

    async def finish(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.close()
        result = await self._line()
        await self.process.wait()
        return result


class WrkAttack(Attack):
    """wrk -t1 -cN on /v1/client, stopped with SIGINT (it then reports)."""

    def __init__(
        self, port: int, count: int, longest: float, pid: int, baseline: int
    ) -> None:
        self.argv = [
            "wrk",
            "-t1",
            f"-c{count}",
            f"-d{math.ceil(longest)}s",
            "--timeout",
            "10s",
            f"http://127.0.0.1:{port}{harness.TARGET}",
        ]
        self.count, self.pid, self.baseline = count, pid, baseline

    async def ready(self) -> dict[str, Any]:
        # Ready when most of its connections reached the contender, or after 15 s.
        started = time.monotonic()
        while time.monotonic() - started < 15:
            if open_fds(self.pid) - self.baseline >= 0.9 * self.count:
                break
            await asyncio.sleep(0.2)
        return {"ramp_seconds": round(time.monotonic() - started, 2)}

    async def finish(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
        out = (await self.process.stdout.read()).decode()
        await self.process.wait()
        result: dict[str, Any] = {"connections": self.count}
        if m := re.search(r"(\d+) requests in", out):
            result["requests"] = int(m.group(1))
        if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
            result["rps"] = float(m.group(1))
        if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
            result["non_2xx"] = int(m.group(1))
        if m := re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
        ):
            result["socket_errors"] = dict(
                zip(
                    ("connect", "read", "write", "timeout"),
                    map(int, m.groups()),
                    strict=True,
                )
            )
        return result


# --------------------------------------------------------------------------
# one scenario against one contender


def log_errors(log: Path) -> int:
    """Unhandled Errors and tracebacks in a clerkproxy log (and its workers')."""
    count = 0
    for path in log.parent.glob(log.name + "*"):
        text = path.read_text(errors="replace")
        count += text.count("Unhandled Error") + text.count("Traceback")
    return count


async def settled_in(pid: int, expected: int, limit: float, busy: bool) -> float:
    """Wait until the contender has taken the attack in: its fds reached
    C{expected} and stopped growing for a second and, unless the attack
    keeps it C{busy}, it used under half a core in that second (or
    C{limit} passed)."""
    started = time.monotonic()
    peak, peaked = open_fds(pid), started
    cpu = [(started, harness.cpu_seconds(pid))]
    while time.monotonic() - started < limit:
        await asyncio.sleep(0.25)
        now, moment = open_fds(pid), time.monotonic()
        cpu.append((moment, harness.cpu_seconds(pid)))
        if now > peak:
            peak, peaked = now, moment
            continue
        if peak < expected or moment - peaked < 1.0:
            continue
        then, used = next((m, c) for m, c in cpu if m >= moment - 1.0)
        if busy or (cpu[-1][1] - used) / (moment - then) < 0.5:
            break
    return round(time.monotonic() - started, 2)


def await_baseline(pid: int, baseline: int, limit: float) -> tuple[int, float | None]:
    """(fds at the end, seconds until they were back to C{baseline} or None)."""
    started = time.monotonic()
    while True:
        now = open_fds(pid)
        elapsed = time.monotonic() - started
        if now <= baseline:
            return now, round(elapsed, 1)
        if elapsed >= limit:
            return now, None
        time.sleep(0.5)


def run_one(
    scenario: Scenario,
    contender: str,
    s: harness.Setup,
    ports: Ports,
    cfg: Settings,
) -> dict[str, Any]:
    port = ports.proxy
    harness.wait_port_free(port)
    log = s.work / f"{scenario.name}-{contender}.log"
    if contender == "nginx-recipe":
        process = start_nginx_recipe(s, ports)
    else:
        workers = 2 if contender == "clerkproxy-2w" else 1
        process = start_clerkproxy(s, ports, log, workers, cfg.proxy_args)
    count = cfg.attackers or (
        scenario.quick_attackers if cfg.quick else scenario.attackers
    )
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "contender": contender,
        "attackers": count,
        "attack_seconds": cfg.duration,
    }
    try:
        harness.wait_port(port)
        if process.poll() is not None:
            raise RuntimeError(f"{contender} exited at start ({process.returncode})")
        harness.check_answer(port)
        pid = process.pid
        # Warm up: a few concurrent requests, so the pool holds what an
        # ordinary client needs before the baseline is taken.
        asyncio.run(ordinary_requests(port, 0.5, 8, cfg.timeout))
        time.sleep(0.5)
        baseline_fds = open_fds(pid)
        result["baseline_fds"] = baseline_fds
        result["baseline_rss_mib"] = round(harness.memory_kib(pid, "VmRSS") / 1024, 1)

        async def attacked() -> None:
            attack: Attack
            if scenario.name == "many-clients":
                longest = cfg.duration + cfg.timeout + 30
                attack = WrkAttack(port, count, longest, pid, baseline_fds)
            else:
                attack = ClientAttack(scenario.name, port, count, cfg.interval)
            try:
                await under_attack(attack)
            finally:
                await attack.reap()

        async def under_attack(attack: Attack) -> None:
            await attack.start()
            result["attack"] = await attack.ready()
            result["attack"]["settled_in_s"] = await settled_in(
                pid,
                baseline_fds + count,
                5.0 if cfg.quick else 30.0,
                busy=scenario.name == "many-clients",
            )
            cpu, started = harness.cpu_seconds(pid), time.monotonic()
            result["ordinary"] = await ordinary_requests(
                port, cfg.duration, cfg.rate, cfg.timeout
            )
            result["cpu_percent"] = round(
                100 * (harness.cpu_seconds(pid) - cpu) / (time.monotonic() - started)
            )
            result["attack"] = {**result["attack"], **await attack.stop()}

        with Sampler(pid) as sampler:
            asyncio.run(attacked())
        result["contender_exited"] = process.poll()
        result["peak_fds"] = sampler.peak_fds
        result["peak_rss_mib"] = round(sampler.peak_rss / 1024, 1)
        result["tcp_buffers_mib"] = round(sampler.peak_tcp - sampler.baseline_tcp)
        after, seconds = await_baseline(pid, baseline_fds, cfg.settle)
        result["fds_after"] = after
        result["fds_back_after_s"] = seconds
        result["settle_limit_s"] = cfg.settle
    finally:
        harness.stop(process)
    result["log_errors"] = log_errors(log) if contender != "nginx-recipe" else None
    return result


# --------------------------------------------------------------------------
# report


def table(results: list[dict[str, Any]], cfg: Settings) -> str:
    lines = [
        f"Ordinary client: {cfg.rate:g} GET /v1/client a second, each on a new "
        f"connection, for {cfg.duration:g} s under attack; a request with no "
        f"answer in {cfg.timeout:g} s counts as failed. Fds are back when they "
        f"reach the pre-attack baseline within {cfg.settle:g} s of the attack's end. "
        "CPU is the contender's, while the ordinary client runs; TCP buffers is the "
        "growth of the whole machine's TCP socket memory (/proc/net/sockstat).",
        "",
        "| scenario | contender | attackers | requests | p50 ms | p99 ms | 5xx | no answer "
        "| CPU % | peak RSS MiB | TCP buffers MiB | peak fds | fds before → after | fds back "
        "| log errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        o = r.get("ordinary", {})
        back = r.get("fds_back_after_s")
        lines.append(
            f"| {r['scenario']} | {r['contender']} | {r['attackers']:,} "
            f"| {o.get('requests', '-')} | {o.get('p50_ms', '-')} | {o.get('p99_ms', '-')} "
            f"| {o.get('5xx', '-')} | {o.get('no_answer', '-')} "
            f"| {r.get('cpu_percent', '-')} | {r.get('peak_rss_mib', '-')} "
            f"| {r.get('tcp_buffers_mib', '-')} | {r.get('peak_fds', '-')} "
            f"| {r.get('baseline_fds', '-')} → {r.get('fds_after', '-')} "
            f"| {'no' if back is None else f'{back:g} s'} "
            f"| {'-' if r.get('log_errors') is None else r['log_errors']} |"
        )
    return "\n".join(lines)


def warn_kernel_memory(cfg: Settings) -> None:
    """Say so when stalled readers may exceed the kernel's TCP memory limits:
    each can hold up to the largest TCP send buffer (tcp_wmem's third
    field) on the proxy's side, and past tcp_mem's middle field the kernel
    slows every connection on the machine."""
    readers = [s for s in cfg.scenarios if s.name.endswith("readers")]
    if not readers:
        return
    count = cfg.attackers or max(
        s.quick_attackers if cfg.quick else s.attackers for s in readers
    )
    try:
        wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
        pressure = int(Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    if count * wmem > pressure * page:
        print(
            f"bench: warning: {count} stalled readers may hold up to "
            f"{count * wmem / 2**30:.1f} GiB of TCP buffers, past the kernel's "
            f"pressure mark (net.ipv4.tcp_mem: {pressure * page / 2**30:.1f} GiB); "
            "see docs/performance.md, Kernel memory",
            flush=True,
        )


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    cfg = settings(parser, args)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(
                f"bench: {tool} is not installed; run bench/run, which installs it"
            )
    harness.raise_fd_limit()
    # SIGTERM, like Ctrl-C, unwinds through the finally blocks that stop
    # every process this run started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    output: Path = args.output
    if output == parser.get_default("output"):
        output = HERE / "results" / "scenarios.md"
    warn_kernel_memory(cfg)
    work = Path(tempfile.mkdtemp(prefix="clerkproxy-scenarios-"))
    s = harness.make_setup(work, BIG_SIZE)
    ports = Ports.free()
    upstream = start_upstream(s, ports)
    results: list[dict[str, Any]] = []
    broken: list[str] = []
    try:
        for scenario in cfg.scenarios:
            for contender in cfg.contenders:
                started = time.monotonic()
                r = run_one(scenario, contender, s, ports, cfg)
                r["wall_seconds"] = round(time.monotonic() - started, 1)
                results.append(r)
                o = r["ordinary"]
                print(
                    f"{scenario.name} {contender}: {r['attackers']} attackers, "
                    f"ordinary p50 {o['p50_ms']} ms p99 {o['p99_ms']} ms "
                    f"5xx {o['5xx']} no-answer {o['no_answer']} {o['statuses']}, "
                    f"peak RSS {r['peak_rss_mib']} MiB, fds {r['baseline_fds']} "
                    f"peak {r['peak_fds']} after {r['fds_after']}, "
                    f"log errors {r['log_errors']}, attack {r['attack']} "
                    f"({r['wall_seconds']} s)",
                    flush=True,
                )
                if (
                    not r["attack"].get("connected", 1)
                    or not o["statuses"]
                    or r["contender_exited"] is not None
                ):
                    broken.append(f"{scenario.name} {contender}")
    finally:
        harness.stop(upstream)
        # Keep clerkproxy's logs beside the report, for the errors column.
        logs = output.with_name(output.stem + "-logs")
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        for log in work.glob("*.log*"):
            if "clerkproxy" in log.name:
                shutil.copy(log, logs)
        shutil.rmtree(work, ignore_errors=True)
    text = table(results, cfg)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(text)
    if broken:
        sys.exit(
            "bench: the contender exited, or the attack or the ordinary client "
            "never got through, in: " + ", ".join(broken)
        )
