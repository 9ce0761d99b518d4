"""
TLS material from the operator's files: the serving certificate and key,
and private trust roots for FAPI.  Every failure is a L{ConfigError} naming
the option and the file.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto
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

if TYPE_CHECKING:
    from ._twisted_compat import IOpenSSLTrustRoot

__all__ = [
    "HTTP_PROTOCOLS",
    "ReloadableServerTLS",
    "load_trust_root",
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


def tls_options(key: Any, chain: list[x509.Certificate]) -> CertificateOptions:
    """
    Server-side TLS for a private key and its chain (leaf first), or with
    no certificate at all when both are empty: TLS 1.2 at least,
    forward-secret ciphers, L{HTTP_PROTOCOLS} by ALPN.

    @raise SSL.Error: The key does not match the certificate.
    """
    # Twisted's annotations name pyOpenSSL's types, but pyOpenSSL takes
    # cryptography's objects directly (and deprecates its own wrappers).
    modern: Any = (key, chain[0] if chain else None, chain[1:])
    options = CertificateOptions(
        privateKey=modern[0],
        certificate=modern[1],
        extraCertChain=modern[2] or None,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=MODERN_CIPHERS,
        acceptableProtocols=list(HTTP_PROTOCOLS),
    )
    options.getContext()
    return options


def read_certificate_files(
    certPath: str,
    keyPath: str,
    certOption: str = "--tls-cert",
    keyOption: str = "--tls-key",
) -> tuple[Any, list[x509.Certificate]]:
    """The private key and chain in two PEM files, checked to match."""
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
    try:
        tls_options(key, chain)
    except SSL.Error:
        raise ConfigError(
            f"{keyOption} {keyPath} does not match the certificate in "
            f"{certOption} {certPath}"
        ) from None
    return key, chain


def server_tls_options(certPath: str, keyPath: str) -> CertificateOptions:
    """
    Server-side TLS from a PEM chain (leaf first) and its private key:
    TLS 1.2 at least, forward-secret ciphers, L{HTTP_PROTOCOLS} by ALPN.
    """
    key, chain = read_certificate_files(certPath, keyPath)
    return tls_options(key, chain)


@implementer(IOpenSSLContextFactory)
class ReloadableServerTLS:
    """
    The serving certificate, swappable while the process runs.

    Twisted asks a context factory for a context on every new connection,
    so after L{reload} new handshakes use the new certificate while the
    connections already open keep theirs.
    """

    def __init__(self, certPath: str, keyPath: str) -> None:
        self._certPath = certPath
        self._keyPath = keyPath
        self._options = server_tls_options(certPath, keyPath)

    def getContext(self) -> SSL.Context:
        context: SSL.Context = self._options.getContext()
        return context

    def reload(self) -> None:
        """
        Read the files again.  On any problem raise L{ConfigError} and keep
        serving the certificate already loaded.
        """
        self._options = server_tls_options(self._certPath, self._keyPath)
