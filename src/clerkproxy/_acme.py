"""
Automatic certificates over ACME (RFC 8555), with the C{acme} library.

L{AcmeManager} keeps one certificate per name in C{--acme-dir}, obtains the
missing ones at start-up, renews each at two thirds of its lifetime (or
when the server's renewal information says so), and installs every new
certificate in the L{SNIServerTLS} listener, where new handshakes pick it
up while open connections keep theirs.

The C{acme} library blocks (it is built on C{requests}), so every call to
the ACME server runs in the reactor's thread pool; the reactor thread only
publishes challenges, installs certificates and schedules the next attempt.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from acme import client as acme_client
from acme import crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from josepy.b64 import b64encode
from josepy.interfaces import JSONDeSerializable
from josepy.jwk import JWKRSA
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.server import Request

from ._config import ConfigError
from ._sni import SNIServerTLS, normalise

__all__ = [
    "HTTP_01",
    "LETS_ENCRYPT",
    "LETS_ENCRYPT_STAGING",
    "TLS_ALPN_01",
    "AcmeManager",
    "AcmeSettings",
    "Http01Responses",
    "challenge_certificate",
]

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
TLS_ALPN_01 = "tls-alpn-01"
HTTP_01 = "http-01"
CHALLENGES = (TLS_ALPN_01, HTTP_01)
#: Where http-01 answers live (RFC 8555, section 8.3).
HTTP_01_PREFIX = b"/.well-known/acme-challenge/"
#: RFC 8737's acmeIdentifier extension.
_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")

_log = Logger(namespace="clerkproxy")


@attrs.frozen
class AcmeSettings:
    """
    What C{--acme-*} says.

    @ivar domains: The names to obtain certificates for.
    @ivar directory: The ACME server's directory URL.
    @ivar email: The account's contact address, if any.
    @ivar ca: PEM trust roots for a private ACME server's HTTPS, if any.
    @ivar path: The directory for the account key and the certificates.
    @ivar challenges: The challenge types to use, by preference.
    """

    domains: tuple[str, ...]
    path: str
    directory: str = LETS_ENCRYPT
    email: str | None = None
    ca: str | None = None
    challenges: tuple[str, ...] = CHALLENGES


def challenge_certificate(
    name: str, digest: bytes, key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    """
    A C{tls-alpn-01} certificate (RFC 8737): self-signed for C{name}, with
    the critical C{acmeIdentifier} extension holding C{digest}, the SHA-256
    of the key authorisation, as a DER OCTET STRING.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .add_extension(
            x509.UnrecognizedExtension(
                _ACME_IDENTIFIER, b"\x04" + bytes([len(digest)]) + digest
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


class Http01Responses(resource.Resource):
    """
    The C{http-01} answers being asked for, by token, served at
    C{/.well-known/acme-challenge/TOKEN} on the plain listener.
    """

    isLeaf = True

    def __init__(self) -> None:
        resource.Resource.__init__(self)
        self._answers: dict[bytes, bytes] = {}

    def add(self, token: str, keyAuthorization: str) -> None:
        self._answers[token.encode("ascii")] = keyAuthorization.encode("ascii")

    def remove(self, token: str) -> None:
        self._answers.pop(token.encode("ascii"), None)

    def render(self, request: Request) -> bytes:
        token = request.path[len(HTTP_01_PREFIX) :]
        answer = self._answers.get(token)
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Type", b"text/plain")
        if answer is None:
            request.setResponseCode(404)
            return b"no such challenge\n"
        return answer


# -- files ---------------------------------------------------------------


def _write(path: str, data: bytes) -> None:
    """Replace C{path} atomically with a file only this user can read."""
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _private_directory(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as e:
        raise ConfigError(f"cannot use --acme-dir {path}: {e.strerror}") from None


@attrs.frozen
class _Stored:
    key: Any
    chain: list[x509.Certificate]
    pem: bytes

    @property
    def notBefore(self) -> datetime.datetime:
        return self.chain[0].not_valid_before_utc

    @property
    def notAfter(self) -> datetime.datetime:
        return self.chain[0].not_valid_after_utc


class _Directory:
    """The files under C{--acme-dir}: C{account.key} and C{certs/NAME.*}."""

    def __init__(self, path: str) -> None:
        self.path = path
        _private_directory(path)
        _private_directory(os.path.join(path, "certs"))

    def accountKey(self) -> JWKRSA:
        path = os.path.join(self.path, "account.key")
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
        except FileNotFoundError:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write(path, _pem(key))
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{path} is not an RSA key")
        return JWKRSA(key=key)

    def _paths(self, name: str) -> tuple[str, str]:
        base = os.path.join(self.path, "certs", name)
        return base + ".pem", base + ".key"

    def load(self, name: str) -> _Stored | None:
        certPath, keyPath = self._paths(name)
        try:
            with open(certPath, "rb") as f:
                pem = f.read()
            with open(keyPath, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
            chain = x509.load_pem_x509_certificates(pem)
        except (OSError, ValueError, TypeError):
            return None
        names = (
            chain[0]
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value.get_values_for_type(x509.DNSName)
        )
        if name not in [normalise(n) for n in names]:
            return None
        return _Stored(key, chain, pem)

    def save(self, name: str, key: Any, pem: bytes) -> _Stored:
        certPath, keyPath = self._paths(name)
        _write(keyPath, _pem(key))
        _write(certPath, pem)
        return _Stored(key, x509.load_pem_x509_certificates(pem), pem)


def _pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


# -- talking to the ACME server (in threads) ----------------------------


class _Network(acme_client.ClientNetwork):
    """Remembers the last C{Retry-After} an error response carried."""

    retryAfter: str | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        response = super()._send_request(method, url, *args, **kwargs)
        if response.status_code >= 400:
            self.retryAfter = response.headers.get("Retry-After")
        return response


class _EmptyObject(JSONDeSerializable):
    """C{{}}: how a challenge is answered (an empty body is a POST-as-GET)."""

    def to_partial_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, jobj: Any) -> _EmptyObject:
        return cls()

    def __bool__(self) -> bool:
        return True


@attrs.frozen
class _Pending:
    """One challenge to publish and answer."""

    name: str
    kind: str
    token: str
    keyAuthorization: str
    uri: str


class _Session:
    """
    A registered ACME account.  Every method blocks and runs in a thread;
    one lock keeps the session's calls in sequence.
    """

    def __init__(self, settings: AcmeSettings, accountKey: JWKRSA) -> None:
        self._settings = settings
        self._key = accountKey
        self._client: acme_client.ClientV2 | None = None
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    @property
    def network(self) -> _Network | None:
        return self._client.net if self._client is not None else None  # type: ignore[return-value]

    def client(self) -> acme_client.ClientV2:
        if self._client is not None:
            return self._client
        settings = self._settings
        verify: Any = settings.ca or True
        net = _Network(self._key, user_agent="clerkproxy", verify_ssl=verify)
        directory = acme_client.ClientV2.get_directory(settings.directory, net)
        client = acme_client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=settings.email, terms_of_service_agreed=True
        )
        try:
            client.new_account(registration)
        except errors.ConflictError as e:
            net.account = messages.RegistrationResource(
                uri=e.location, body=messages.Registration()
            )
        self._client = client
        return client

    def keyAuthorization(self, token: str) -> str:
        thumbprint = self._key.public_key().thumbprint(hash_function=hashes.SHA256)
        return f"{token}.{b64encode(thumbprint).decode('ascii')}"

    def order(self, name: str, key: Any) -> tuple[Any, list[_Pending]]:
        client = self.client()
        csr = crypto_util.make_csr(_pem(key), [name])
        order = client.new_order(csr)
        pending = []
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue
            # acme 5 has no class for tls-alpn-01: read the JSON of each.
            offered = {
                c.chall.to_partial_json().get("type"): c
                for c in authorization.body.challenges
            }
            chosen = next((k for k in self._settings.challenges if k in offered), None)
            if chosen is None:
                wanted = ", ".join(self._settings.challenges)
                raise errors.Error(f"the ACME server offers none of {wanted}")
            body = offered[chosen]
            token = body.chall.to_partial_json()["token"]
            pending.append(
                _Pending(name, chosen, token, self.keyAuthorization(token), body.uri)
            )
        return order, pending

    def finish(self, order: Any, pending: Sequence[_Pending]) -> bytes:
        client = self.client()
        for challenge in pending:
            client.net.post(
                challenge.uri,
                _EmptyObject(),
                new_nonce_url=client.directory["newNonce"],
            )
        # Polled here rather than by the library, so that stopping the
        # process does not wait for a validation to finish.
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=90)
        valid = []
        for authorization in order.authorizations:
            while True:
                if self.stopping.is_set():
                    raise errors.Error("the proxy is stopping")
                authorization, _ = client.poll(authorization)
                if authorization.body.status != messages.STATUS_PENDING:
                    break
                if datetime.datetime.now() > deadline:
                    raise errors.TimeoutError()
                self.stopping.wait(0.5)
            valid.append(authorization)
        failed = [a for a in valid if a.body.status != messages.STATUS_VALID]
        if failed:
            raise errors.ValidationError(failed)
        done = client.finalize_order(order.update(authorizations=valid), deadline)
        return str(done.fullchain_pem).encode("ascii")

    def renewalTime(self, pem: bytes) -> datetime.datetime | None:
        """The server's suggested renewal time (ARI), if it offers one."""
        client = self.client()
        if "renewalInfo" not in client.directory:
            return None
        when, _ = client.renewal_time(pem)
        if when is not None and when.tzinfo is None:
            when = when.astimezone(datetime.timezone.utc)
        return when


def _describe(failure: Failure) -> str:
    error = failure.value
    if isinstance(error, messages.Error):
        return f"{error.typ}: {error.detail}"
    if isinstance(error, errors.ValidationError):
        problems = []
        for authorization in error.failed_authzrs:
            for challenge in authorization.body.challenges:
                if challenge.error is not None:
                    kind = challenge.chall.to_partial_json().get("type")
                    problems.append(f"{kind}: {challenge.error.detail}")
        return "validation failed: " + "; ".join(problems)
    return f"{type(error).__name__}: {error}"


def _retry_after(value: str | None, now: datetime.datetime) -> float:
    if not value:
        return 0.0
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - now).total_seconds())


# -- the manager (on the reactor thread) --------------------------------


class AcmeManager:
    """
    Obtains and renews a certificate for each of C{settings.domains}.

    @param tls: Where certificates and C{tls-alpn-01} challenges go.
    @param http01: Where C{http-01} answers go.
    @param onFailure: Called once per failed attempt (for the metric).
    @param retryBase: Seconds before the first retry after a failure; each
        further failure doubles it, up to C{retryMax}.
    @param runInThread: How blocking calls leave the reactor thread.
    """

    def __init__(
        self,
        reactor: Any,
        settings: AcmeSettings,
        tls: SNIServerTLS,
        http01: Http01Responses,
        onFailure: Callable[[], None] = lambda: None,
        retryBase: float = 60.0,
        retryMax: float = 6 * 3600.0,
        runInThread: Callable[..., Deferred[Any]] = deferToThread,
    ) -> None:
        self._reactor = reactor
        self._settings = settings
        self._tls = tls
        self._http01 = http01
        self._onFailure = onFailure
        self._retryBase = retryBase
        self._retryMax = retryMax
        self._thread = runInThread
        self._files = _Directory(settings.path)
        self._session = _Session(settings, self._files.accountKey())
        self._timers: dict[str, IDelayedCall] = {}
        self._failures: dict[str, int] = {}
        self._stopped = False
        self.issued = 0
        self.failures = 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(normalise(n) for n in self._settings.domains)

    def missing(self) -> list[str]:
        """The names that have no certificate yet."""
        return [n for n in self.names if not self._tls.hasCertificate(n)]

    def waiting(self) -> str | None:
        """Why C{/readyz} says not ready: names with no certificate yet."""
        missing = self.missing()
        if not missing:
            return None
        return "no certificate yet for " + ", ".join(missing)

    def start(self) -> None:
        """Serve what is on disk; obtain or schedule the rest."""
        for name in self.names:
            stored = self._files.load(name)
            if stored is not None and stored.notAfter > self._now():
                self._tls.install([name], stored.key, stored.chain)
                _log.info(
                    "ACME: {name}: using the certificate in {path} (expires {expiry})",
                    name=name,
                    path=self._settings.path,
                    expiry=stored.notAfter.isoformat(),
                )
                self._scheduleRenewal(name, stored)
            else:
                self._at(name, 0)

    def stop(self) -> None:
        self._stopped = True
        self._session.stopping.set()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(
            self._reactor.seconds(), datetime.timezone.utc
        )

    def _at(self, name: str, delay: float) -> None:
        if self._stopped:
            return
        old = self._timers.pop(name, None)
        if old is not None and old.active():
            old.cancel()
        delay = max(0.0, delay)
        self._timers[name] = self._reactor.callLater(delay, self._obtain, name)

    def renewalDelay(self, stored: _Stored) -> float:
        """Seconds until two thirds of the lifetime, give or take 1/30."""
        lifetime = (stored.notAfter - stored.notBefore).total_seconds()
        due = stored.notBefore + datetime.timedelta(seconds=lifetime * 2 / 3)
        jitter = random.uniform(-lifetime / 30, lifetime / 30)  # noqa: S311
        return (due - self._now()).total_seconds() + jitter

    def _scheduleRenewal(self, name: str, stored: _Stored) -> None:
        delay = self.renewalDelay(stored)
        self._at(name, delay)

        def ari(when: datetime.datetime | None) -> None:
            if when is None or self._stopped:
                return
            seconds = (when - self._now()).total_seconds()
            if seconds < delay:
                _log.info(
                    "ACME: {name}: the server suggests renewing at {when}",
                    name=name,
                    when=when.isoformat(),
                )
                self._at(name, seconds)

        d = self._thread(self._locked, self._session.renewalTime, stored.pem)
        d.addCallbacks(ari, lambda f: None)

    def _locked(self, call: Callable[..., Any], *args: Any) -> Any:
        with self._session.lock:
            return call(*args)

    def _obtain(self, name: str) -> Deferred[None]:
        self._timers.pop(name, None)
        key = ec.generate_private_key(ec.SECP256R1())
        published: list[_Pending] = []

        def publish(result: tuple[Any, list[_Pending]]) -> Deferred[bytes]:
            order, pending = result
            for challenge in pending:
                self._publish(challenge)
                published.append(challenge)
            return self._thread(self._locked, self._session.finish, order, pending)

        def issued(pem: bytes) -> None:
            stored = self._files.save(name, key, pem)
            self._tls.install([name], stored.key, stored.chain)
            self._failures.pop(name, None)
            self.issued += 1
            _log.info(
                "ACME: {name}: new certificate installed (expires {expiry})",
                name=name,
                expiry=stored.notAfter.isoformat(),
            )
            self._scheduleRenewal(name, stored)

        def failed(failure: Failure) -> None:
            self.failures += 1
            self._onFailure()
            count = self._failures[name] = self._failures.get(name, 0) + 1
            delay = min(self._retryMax, self._retryBase * 2 ** (count - 1))
            network = self._session.network
            if network is not None:
                delay = max(delay, _retry_after(network.retryAfter, self._now()))
                network.retryAfter = None
            current = self._files.load(name)
            keeping = "no certificate yet"
            if current is not None and self._tls.hasCertificate(name):
                expiry = current.notAfter.isoformat()
                keeping = f"keeping the current certificate (expires {expiry})"
            _log.error(
                "ACME: {name}: obtaining a certificate failed ({error}); "
                "{keeping}; retrying in {delay:.0f}s",
                name=name,
                error=_describe(failure),
                keeping=keeping,
                delay=delay,
            )
            self._at(name, delay)

        def cleanup(result: object) -> object:
            for challenge in published:
                self._unpublish(challenge)
            return result

        d = self._thread(self._locked, self._session.order, name, key)
        d.addCallback(publish)
        d.addBoth(cleanup)
        d.addCallback(issued)
        d.addErrback(failed)
        return d

    def _publish(self, challenge: _Pending) -> None:
        if challenge.kind == HTTP_01:
            self._http01.add(challenge.token, challenge.keyAuthorization)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            digest = hashlib.sha256(challenge.keyAuthorization.encode("ascii")).digest()
            self._tls.setChallenge(
                challenge.name, key, challenge_certificate(challenge.name, digest, key)
            )

    def _unpublish(self, challenge: _Pending) -> None:
        if challenge.kind == HTTP_01:
            self._http01.remove(challenge.token)
        else:
            self._tls.clearChallenge(challenge.name)
