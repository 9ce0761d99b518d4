"""
Serving many certificates on one TLS listener: the certificate is picked by
the name the client asks for (SNI), and ACME's C{tls-alpn-01} challenge
certificates are served only to clients that offer ALPN C{acme-tls/1}.

Every connection starts on a context holding no certificate.  OpenSSL's
server-name callback switches the connection to the context of the name
asked for; a name with no certificate (yet) stays on the empty context, so
its handshake fails cleanly instead of showing some other site's
certificate.  The ALPN callback, which OpenSSL runs after the server-name
callback and before it picks the certificate to send, switches to a
challenge context when the client offers C{acme-tls/1} and a challenge is
pending for the name.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

from ._config import ConfigError
from ._tls import (
    HTTP_PROTOCOLS,
    ReloadableServerTLS,
    read_certificate_files,
    tls_options,
)

__all__ = ["ACME_TLS_1", "CertificateFiles", "SNIServerTLS", "ServerTLS"]

#: RFC 8737's ALPN protocol for tls-alpn-01 validation.
ACME_TLS_1 = b"acme-tls/1"


@attrs.frozen
class CertificateFiles:
    """An operator's certificate and key files, serving C{names}."""

    names: tuple[str, ...]
    cert: str
    key: str
    certOption: str = "--tls-cert"
    keyOption: str = "--tls-key"


def normalise(name: str) -> str:
    """A host name as SNI and C{Host} compare it: lower case, no final dot."""
    return name.strip().rstrip(".").lower()


@attrs.frozen
class _Served:
    context: SSL.Context
    notAfter: datetime.datetime
    key: Any
    chain: list[x509.Certificate]


@implementer(IOpenSSLContextFactory)
class SNIServerTLS:
    """
    A context factory choosing each connection's certificate by SNI.

    @ivar protocols: The application protocols offered by ALPN, in order of
        preference (besides C{acme-tls/1}).
    """

    def __init__(self, protocols: Sequence[bytes] = HTTP_PROTOCOLS) -> None:
        self.protocols = tuple(protocols)
        self._served: dict[str, _Served] = {}
        self._challenges: dict[str, SSL.Context] = {}
        self._files: list[CertificateFiles] = []
        self._default: str | None = None
        self._base = self._baseContext()

    def _baseContext(self) -> SSL.Context:
        # OpenSSL keeps using the first context's session cache and ticket
        # keys after the switch to a name's context: this one's.
        base = self._context(None, [])
        base.set_tlsext_servername_callback(self._onServerName)
        return base

    # -- what the listener asks ------------------------------------------

    def getContext(self) -> SSL.Context:
        return self._base

    def _context(self, key: Any, chain: list[x509.Certificate]) -> SSL.Context:
        context: SSL.Context = tls_options(key, chain).getContext()
        context.set_alpn_select_callback(self._selectProtocol)
        return context

    def _onServerName(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        if raw is None:
            name = self._default
        else:
            name = normalise(raw.decode("ascii", "replace"))
        served = self._lookup(name) if name is not None else None
        if served is not None:
            connection.set_context(served.context)

    def _lookup(self, name: str) -> _Served | None:
        served = self._served.get(name)
        if served is None and "." in name:
            served = self._served.get("*." + name.split(".", 1)[1])
        return served

    def _selectProtocol(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        if ACME_TLS_1 in offered:
            raw = connection.get_servername()
            name = normalise(raw.decode("ascii", "replace")) if raw else ""
            challenge = self._challenges.get(name)
            if challenge is None:
                raise SSL.Error("acme-tls/1 offered but no challenge is pending")
            connection.set_context(challenge)
            return ACME_TLS_1
        for protocol in self.protocols:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    # -- what the proxy sets ----------------------------------------------

    def install(
        self, names: Iterable[str], key: Any, chain: list[x509.Certificate]
    ) -> None:
        """
        Serve C{chain} with C{key} for C{names} from the next handshake on;
        connections already open keep the certificate they have.
        """
        served = _Served(
            self._context(key, chain), chain[0].not_valid_after_utc, key, chain
        )
        for name in names:
            name = normalise(name)
            self._served[name] = served
            if self._default is None:
                self._default = name

    def addFiles(self, files: CertificateFiles) -> None:
        """Serve an operator's certificate files, reloaded by L{reload}."""
        key, chain = read_certificate_files(
            files.cert, files.key, files.certOption, files.keyOption
        )
        self.install(files.names, key, chain)
        self._files.append(files)

    def reload(self) -> None:
        """
        Read every operator's certificate file again.  A broken pair keeps
        serving its previous certificate; the others still reload, and one
        L{ConfigError} names every broken pair.
        """
        problems = []
        for files in self._files:
            try:
                key, chain = read_certificate_files(
                    files.cert, files.key, files.certOption, files.keyOption
                )
            except ConfigError as e:
                problems.append(str(e))
                continue
            self.install(files.names, key, chain)
        if problems:
            raise ConfigError("; ".join(problems))

    def rotateTicketKeys(self) -> None:
        """
        New handshakes get new contexts: new random session ticket keys and
        an empty session cache (see L{TICKET_KEY_LIFETIME}).
        """
        fresh: dict[int, _Served] = {}
        for name, served in list(self._served.items()):
            if id(served) not in fresh:
                fresh[id(served)] = attrs.evolve(
                    served, context=self._context(served.key, served.chain)
                )
            self._served[name] = fresh[id(served)]
        self._base = self._baseContext()

    def hasCertificate(self, name: str) -> bool:
        return self._lookup(normalise(name)) is not None

    def expiries(self) -> dict[str, datetime.datetime]:
        """Each name's certificate's C{notAfter}."""
        return {name: served.notAfter for name, served in self._served.items()}

    def setChallenge(self, name: str, key: Any, certificate: x509.Certificate) -> None:
        """Answer C{tls-alpn-01} for C{name} with this certificate."""
        self._challenges[normalise(name)] = self._context(key, [certificate])

    def clearChallenge(self, name: str) -> None:
        self._challenges.pop(normalise(name), None)


#: What a TLS listener serves: one certificate, or one per name.
ServerTLS = ReloadableServerTLS | SNIServerTLS
