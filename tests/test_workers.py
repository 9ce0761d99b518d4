"""`--workers N`: several processes on the same ports, restarted when they die."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from helpers import (
    free_port,
    start_against,
    start_with_admin,
    stop,
    twistd,
    wait_listening,
)
from twisted.internet.threads import deferToThread

from clerkproxy._config import ConfigError
from clerkproxy._endpoints import default_backlog
from clerkproxy._workers import ListenSpec, worker_listen_spec


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def get(port: int) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/__clerk/v1/environment")
    status = conn.getresponse().status
    conn.close()
    return status


def wait_for(predicate: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition never held")


@pytest_twisted.ensureDeferred
async def test_two_workers_both_answer_and_a_dead_one_comes_back(
    fapi: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    port = free_port()
    process = start_against(
        fapi,
        ca,
        tmp_path,
        ["--port", f"tcp:{port}:interface=127.0.0.1", "--workers", "2"],
    )

    def scenario() -> list[int]:
        wait_listening(port, process)
        wait_for(lambda: len(children(process.pid)) == 2)
        first, second = children(process.pid)
        statuses = []
        # With one worker frozen, the other answers everything; then swap.
        for frozen in (first, second):
            os.kill(frozen, signal.SIGSTOP)
            try:
                statuses += [get(port) for _ in range(3)]
            finally:
                os.kill(frozen, signal.SIGCONT)
        # Killing a worker does not lose the port, and it is replaced.
        os.kill(first, signal.SIGKILL)
        statuses += [get(port) for _ in range(3)]
        wait_for(
            lambda: (
                len(children(process.pid)) == 2 and first not in children(process.pid)
            )
        )
        statuses.append(get(port))
        return statuses

    try:
        statuses = await deferToThread(scenario)
        workers = children(process.pid)
    finally:
        output = await deferToThread(stop, process)
    assert statuses == [200] * 10
    assert "restarting" in output
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_auto_and_bad_values() -> None:
    from clerkproxy._settings import _workers_count

    assert _workers_count("auto") == (os.cpu_count() or 1)
    assert _workers_count("3") == 3
    for bad in ("0", "-1", "many", ""):
        with pytest.raises(ConfigError, match="--workers"):
            _workers_count(bad)


def test_worker_ports() -> None:
    backlog = default_backlog()
    assert worker_listen_spec("443", True) == ListenSpec(443, "", backlog, True, False)
    assert worker_listen_spec(
        "tcp:8080:interface=127.0.0.1:backlog=10", False
    ) == ListenSpec(8080, "127.0.0.1", 10, False, False)
    assert worker_listen_spec("haproxy:tcp:8443", False) == ListenSpec(
        8443, "", backlog, False, True
    )
    assert worker_listen_spec("tcp:port=9:interface=\\:\\:1", False).interface == "::1"
    for bad in (
        "ssl:443:privateKey=k",
        "unix:/tmp/s",
        "systemd:domain=INET:index=0",
        "tcp:80:reuse=1",
    ):
        with pytest.raises(ConfigError, match=r"--port|--workers"):
            worker_listen_spec(bad, False)


def test_workers_with_an_unsupported_port_is_a_clear_error() -> None:
    result = twistd(
        "--proxy-url",
        "https://a.test/__clerk",
        "--workers",
        "2",
        "--port",
        "ssl:443:privateKey=k.pem",
        env={"CLERK_SECRET_KEY": "sk_live_x"},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--workers" in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_a_clear_error(workers: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                str(Path(os.sys.executable).with_name("twistd")),
                "-n",
                "--pidfile=",
                "clerkproxy",
                "--proxy-url",
                "https://a.test/__clerk",
                "--workers",
                "2",
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            env={**os.environ, "CLERK_SECRET_KEY": "sk_live_x"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot listen" in output and "Traceback" not in output


def _admin(port: int, path: str) -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    return response.status, body


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


@pytest_twisted.ensureDeferred
async def test_one_admin_port_adds_up_every_worker(
    fapi: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    process, port, admin = start_with_admin(fapi, ca, tmp_path, "--workers", "2")

    def scenario() -> dict[str, Any]:
        wait_listening(port, process)
        wait_listening(admin, process)
        wait_for(lambda: len(children(process.pid)) == 2)
        wait_for(lambda: _admin(admin, "/readyz")[0] == 200)
        seen: dict[str, Any] = {"ready": _admin(admin, "/readyz")}
        first, second = children(process.pid)
        statuses = []
        # 3 requests to one worker and 4 to the other: freeze the other.
        for frozen, count in ((first, 3), (second, 4)):
            os.kill(frozen, signal.SIGSTOP)
            try:
                statuses += [get(port) for _ in range(count)]
                if frozen == first:
                    seen["frozen"] = _admin(admin, "/readyz")
            finally:
                os.kill(frozen, signal.SIGCONT)
        seen["statuses"] = statuses
        seen["metrics"] = _admin(admin, "/metrics")
        # A worker that dies keeps its counts in the totals.
        os.kill(first, signal.SIGKILL)
        wait_for(
            lambda: (
                len(children(process.pid)) == 2 and first not in children(process.pid)
            )
        )
        wait_for(lambda: _admin(admin, "/readyz")[0] == 200)
        statuses.append(get(port))
        seen["after"] = _admin(admin, "/metrics")
        return seen

    try:
        seen = await deferToThread(scenario)
    finally:
        await deferToThread(stop, process)
    assert seen["statuses"] == [200] * 8
    assert seen["ready"][0] == 200
    assert seen["ready"][1].count(": ready") == 2
    status, body = seen["frozen"]
    assert status == 503 and "not answering" in body and ": ready" in body
    status, text = seen["metrics"]
    assert status == 200
    requests = _samples(text, "clerkproxy_requests_total")
    assert requests == [({"method": "GET", "code": "200", "protocol": "HTTP/1.1"}, 7.0)]
    assert _samples(text, "clerkproxy_request_duration_seconds_count") == [({}, 7.0)]
    buckets = _samples(text, "clerkproxy_request_duration_seconds_bucket")
    assert buckets[-1] == ({"le": "+Inf"}, 7.0)
    connections = _samples(text, "clerkproxy_client_connections")
    assert sorted(labels["worker"] for labels, _ in connections) == ["0", "1"]
    assert _samples(text, "clerkproxy_workers_answering") == [({}, 2.0)]
    # One FAPI connection per worker: each served requests.
    opened = _samples(text, "clerkproxy_upstream_connections_opened_total")
    assert opened == [({}, 2.0)]
    _, after = seen["after"]
    assert _samples(after, "clerkproxy_requests_total") == [
        ({"method": "GET", "code": "200", "protocol": "HTTP/1.1"}, 8.0)
    ]
