"""
TLS material from the operator's files: the serving certificate and key,
and private trust roots for FAPI.  Every failure is a L{ConfigError} naming
the option and the file.

The serving side follows Mozilla's "intermediate" profile: TLS 1.2 and
1.3, forward-secret AEAD suites chosen by the client, the groups in
L{GROUPS}, and session resumption (tickets, and a session cache for
clients without them) with ticket keys that are replaced on a timer.
"""

from __future__ import annotations

import datetime
import functools
import re
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from zope.interface import implementer

from ._config import ConfigError
from ._twisted_compat import clear_tls_options

if TYPE_CHECKING:
    from ._twisted_compat import IOpenSSLTrustRoot

__all__ = [
    "GROUPS",
    "HTTP_PROTOCOLS",
    "TICKET_KEY_LIFETIME",
    "ReloadableServerTLS",
    "load_trust_root",
    "read_certificate_files",
    "server_tls_options",
    "tls_options",
]

#: The application protocols offered by ALPN on every TLS listener, in the
#: server's order of preference.  This is the one place the list lives: the
#: single-certificate listener and the SNI listener (which adds
#: C{acme-tls/1} for ACME challenges) both read it.
HTTP_PROTOCOLS: tuple[bytes, ...] = (b"http/1.1",)

#: Forward-secret AEAD suites only; TLS 1.3's own suites are always on.
MODERN_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS"
)

#: Key exchange groups, most preferred first.  Mozilla's intermediate
#: profile names X25519, P-256 and P-384; P-521 and X448 are offered too, and
#: the post-quantum hybrid first where this OpenSSL has it.  Names this
#: OpenSSL does not know are left out (see L{_set_groups}).
GROUPS = ("X25519MLKEM768", "X25519", "P-256", "X448", "P-384", "P-521")

#: Seconds a session ticket key (and the session cache) lives: every this
#: often new handshakes get a fresh context with new random ticket keys, so
#: a stolen key opens at most this much recorded traffic.  Tickets are
#: issued for the same lifetime.
TICKET_KEY_LIFETIME = 12 * 3600

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _read(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {option} {path}: {e.strerror}") from None


def _certificates(path: str, option: str) -> list[Certificate]:
    data = _read(path, option)
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ConfigError(f"{option} {path} holds no PEM certificate")
    try:
        return [Certificate.loadPEM(block) for block in blocks]
    except (crypto.Error, ValueError):
        raise ConfigError(f"{option} {path} holds a malformed certificate") from None


def load_trust_root(path: str) -> IOpenSSLTrustRoot:
    """Trust exactly the CA certificates in C{path} (for C{--fapi-ca})."""
    root: IOpenSSLTrustRoot = trustRootFromCertificates(
        _certificates(path, "--fapi-ca")
    )
    return root


def server_tls_options(certPath: str, keyPath: str) -> CertificateOptions:
    """
    Server-side TLS from a PEM chain (leaf first) and its private key:
    TLS 1.2 at least, forward-secret ciphers, HTTP/1.1 by ALPN, session
    resumption on.
    """
    return _options(_material(certPath, keyPath))


def _material(
    certPath: str,
    keyPath: str,
    certOption: str = "--tls-cert",
    keyOption: str = "--tls-key",
) -> tuple[Any, Any, list[Any]]:
    """The private key, the leaf and the rest of the chain, checked."""
    _certificates(certPath, certOption)  # clear errors for a bad file
    chain = x509.load_pem_x509_certificates(_read(certPath, certOption))
    keyData = _read(keyPath, keyOption)
    try:
        key = load_pem_private_key(keyData, password=None)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{keyOption} {keyPath} is not a readable PEM private key "
            "(an encrypted key is not supported)"
        ) from None
    material = (key, chain[0], chain[1:])
    try:
        _options(material)
    except SSL.Error:
        raise ConfigError(
            f"{keyOption} {keyPath} does not match the certificate in "
            f"{certOption} {certPath}"
        ) from None
    return material


def read_certificate_files(
    certPath: str,
    keyPath: str,
    certOption: str = "--tls-cert",
    keyOption: str = "--tls-key",
) -> tuple[Any, list[x509.Certificate]]:
    """The private key and the chain (leaf first) in two PEM files."""
    key, leaf, rest = _material(certPath, keyPath, certOption, keyOption)
    return key, [leaf, *rest]


def tls_options(key: Any, chain: list[x509.Certificate]) -> CertificateOptions:
    """
    Server-side TLS (as L{server_tls_options}) for a loaded key and chain,
    or with no certificate at all when both are empty.

    @raise SSL.Error: The key does not match the certificate.
    """
    return _options((key, chain[0] if chain else None, chain[1:]))


def _options(material: tuple[Any, Any, list[Any]]) -> CertificateOptions:
    """
    Fresh options (so a fresh context, with new ticket keys and an empty
    session cache) for already loaded material.
    """
    # Twisted's annotations name pyOpenSSL's types, but pyOpenSSL takes
    # cryptography's objects directly (and deprecates its own wrappers).
    options = CertificateOptions(
        privateKey=material[0],
        certificate=material[1],
        extraCertChain=material[2] or None,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=MODERN_CIPHERS,
        acceptableProtocols=list(HTTP_PROTOCOLS),
        # Twisted turns both off by default; without them no client ever
        # resumes a session and each one pays a full handshake.
        enableSessions=True,
        enableSessionTickets=True,
    )
    # Mozilla's intermediate profile lets the client choose among the
    # (all strong) suites, so one without AES hardware can pick ChaCha20.
    clear_tls_options(options, SSL.OP_CIPHER_SERVER_PREFERENCE)
    context = options.getContext()
    context.set_timeout(TICKET_KEY_LIFETIME)
    _set_groups(context, available_groups())
    return options


@functools.cache
def available_groups() -> tuple[str, ...]:
    """The names in L{GROUPS} that this OpenSSL implements."""
    probe = SSL.Context(SSL.TLS_METHOD)
    found = []
    for name in GROUPS:
        try:
            _set_groups(probe, (name,))
        except SSL.Error:
            continue
        found.append(name)
    return tuple(found)


def _set_groups(context: SSL.Context, names: tuple[str, ...]) -> None:
    # pyOpenSSL has no wrapper for SSL_CTX_set1_groups_list; its binding
    # (under the older name "curves") is there.
    if not _lib.SSL_CTX_set1_curves_list(context._context, ":".join(names).encode()):
        _lib.ERR_clear_error()
        raise SSL.Error(f"unknown TLS groups {names!r}")


@implementer(IOpenSSLContextFactory)
class ReloadableServerTLS:
    """
    The serving certificate, swappable while the process runs.

    Twisted asks a context factory for a context on every new connection,
    so after L{reload} new handshakes use the new certificate while the
    connections already open keep theirs.  One context serves every
    handshake in between, so its session cache and ticket keys let clients
    resume; L{rotateTicketKeys} replaces it (see L{TICKET_KEY_LIFETIME}).
    """

    def __init__(self, certPath: str, keyPath: str) -> None:
        self._certPath = certPath
        self._keyPath = keyPath
        self._material = _material(certPath, keyPath)
        self._options = _options(self._material)

    def getContext(self) -> SSL.Context:
        context: SSL.Context = self._options.getContext()
        return context

    def expiries(self) -> dict[str, datetime.datetime]:
        """The certificate's C{notAfter}, by each DNS name it carries."""
        leaf = self._material[1]
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = san.value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        notAfter: datetime.datetime = leaf.not_valid_after_utc
        return dict.fromkeys(names or ["(no name)"], notAfter)

    def rotateTicketKeys(self) -> None:
        """
        New handshakes get a new context: new random ticket keys and an
        empty session cache.  Sessions from before must do a full
        handshake once.
        """
        self._options = _options(self._material)

    def reload(self) -> None:
        """
        Read the files again.  On any problem raise L{ConfigError} and keep
        serving the certificate already loaded.
        """
        material = _material(self._certPath, self._keyPath)
        self._material, self._options = material, _options(material)
