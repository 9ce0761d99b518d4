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

__all__ = ["ReloadableServerTLS", "load_trust_root", "server_tls_options"]

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


def server_tls_options(certPath: str, keyPath: str) -> CertificateOptions:
    """
    Server-side TLS from a PEM chain (leaf first) and its private key:
    TLS 1.2 at least, forward-secret ciphers, HTTP/1.1 by ALPN.
    """
    _certificates(certPath, "--tls-cert")  # clear errors for a bad file
    chain = x509.load_pem_x509_certificates(_read(certPath, "--tls-cert"))
    keyData = _read(keyPath, "--tls-key")
    try:
        key = load_pem_private_key(keyData, password=None)
    except (TypeError, ValueError):
        raise ConfigError(
            f"--tls-key {keyPath} is not a readable PEM private key "
            "(an encrypted key is not supported)"
        ) from None
    # Twisted's annotations name pyOpenSSL's types, but pyOpenSSL takes
    # cryptography's objects directly (and deprecates its own wrappers).
    modern: Any = (key, chain[0], chain[1:])
    options = CertificateOptions(
        privateKey=modern[0],
        certificate=modern[1],
        extraCertChain=modern[2],
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=MODERN_CIPHERS,
        acceptableProtocols=[b"http/1.1"],
    )
    try:
        options.getContext()
    except SSL.Error:
        raise ConfigError(
            f"--tls-key {keyPath} does not match the certificate in "
            f"--tls-cert {certPath}"
        ) from None
    return options


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
