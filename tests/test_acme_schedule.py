"""When the ACME manager renews and retries, on an injected clock."""

from __future__ import annotations

import datetime
import threading
import time
from pathlib import Path
from typing import Any

from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from clerkproxy._acme import AcmeManager, AcmeSettings, Http01Responses
from clerkproxy._sni import SNIServerTLS

DAY = 86400.0


def certificate(name: str, days: float, key: Any) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class Network:
    retryAfter: str | None = None


class FakeSession:
    """Stands in for the ACME server conversation."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.network = Network()
        self.fail: Exception | None = None
        self.suggested: datetime.datetime | None = None
        self.orders = 0

    def order(self, name: str, key: Any) -> tuple[Any, list[Any]]:
        self.orders += 1
        if self.fail is not None:
            if isinstance(self.fail, messages.Error):
                self.network.retryAfter = "7200"  # as a rate limit says
            raise self.fail
        return (name, key), []

    def finish(self, order: Any, pending: Any) -> bytes:
        return certificate(order[0], 90, order[1])

    def renewalTime(self, pem: bytes) -> datetime.datetime | None:
        return self.suggested


def manager(tmp_path: Path) -> tuple[AcmeManager, FakeSession, Clock]:
    clock = Clock()
    clock.advance(time.time())
    settings = AcmeSettings(domains=("a.test",), path=str(tmp_path / "acme"))
    m = AcmeManager(
        clock,
        settings,
        SNIServerTLS(),
        Http01Responses(),
        runInThread=lambda f, *a: maybeDeferred(f, *a),
    )
    session = FakeSession()
    m._session = session  # type: ignore[assignment]
    return m, session, clock


def delay(m: AcmeManager, clock: Clock) -> float:
    return float(m._timers["a.test"].getTime() - clock.seconds())


def test_renewal_at_two_thirds_jittered_and_earlier_by_ari(tmp_path: Path) -> None:
    m, session, clock = manager(tmp_path)
    m.start()
    clock.advance(0)
    assert m.issued == 1 and m.missing() == []
    # 90 days: renew at 60, give or take 3.
    assert 57 * DAY <= delay(m, clock) <= 63 * DAY
    # The server's renewal information asks for earlier: it wins.
    session.suggested = datetime.datetime.now(
        datetime.timezone.utc
    ) + datetime.timedelta(days=1)
    m2, session2, clock2 = manager(tmp_path)
    session2.suggested = session.suggested
    m2.start()  # from disk: no order, and ARI reschedules
    assert session2.orders == 0
    assert 0.9 * DAY <= delay(m2, clock2) <= 1.1 * DAY


def test_failure_backs_off_and_honours_retry_after(tmp_path: Path) -> None:
    m, session, clock = manager(tmp_path)
    session.fail = messages.Error(typ="urn:ietf:params:acme:error:rateLimited")
    failures = []
    m._onFailure = lambda: failures.append(1)
    m.start()
    clock.advance(0)
    assert failures == [1] and m.missing() == ["a.test"]
    # Retry-After (7200 s) is longer than the first backoff (60 s).
    assert delay(m, clock) == 7200
    session.fail = RuntimeError("boom")
    clock.advance(7200)
    assert failures == [1, 1]
    # No Retry-After this time: the backoff doubles from 60 s.
    assert delay(m, clock) == 120
    session.fail = None
    clock.advance(delay(m, clock))
    assert m.issued == 1 and m.missing() == []
