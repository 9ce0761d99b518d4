"""SNI certificate selection and tls-alpn-01 challenge certificates."""

from __future__ import annotations

import datetime

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL

from clerkproxy._acme import challenge_certificate
from clerkproxy._config import ConfigError
from clerkproxy._sni import ACME_TLS_1, CertificateFiles, SNIServerTLS


def _load(cert: trustme.LeafCert) -> tuple[object, list[x509.Certificate]]:
    key = load_pem_private_key(cert.private_key_pem.bytes(), None)
    chain = x509.load_pem_x509_certificates(
        b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    )
    return key, chain


def handshake(
    server: SNIServerTLS,
    name: bytes | None,
    alpn: list[bytes] | None = None,
    tls12: bool = False,
) -> tuple[x509.Certificate, bytes]:
    """Run a handshake in memory; the leaf the client saw and the protocol."""
    clientContext = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if tls12:
        clientContext.set_max_proto_version(SSL.TLS1_2_VERSION)
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    if name is not None:
        client.set_tlsext_host_name(name)
    if alpn:
        client.set_alpn_protos(alpn)
    srv = SSL.Connection(server.getContext(), None)
    srv.set_accept_state()
    for _ in range(20):
        for a, b in ((client, srv), (srv, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                data = a.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                b.bio_write(data)
        try:
            client.do_handshake()
            srv.do_handshake()
            break
        except SSL.WantReadError:
            continue
    peer = client.get_peer_certificate(as_cryptography=True)
    assert peer is not None
    return peer, client.get_alpn_proto_negotiated()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _common(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("tls12", [False, True])
def test_certificate_by_name(ca: trustme.CA, tls12: bool) -> None:
    server = SNIServerTLS()
    server.install(["a.test"], *_load(ca.issue_cert("a.test")))
    server.install(
        ["b.test", "www.b.test"], *_load(ca.issue_cert("b.test", "www.b.test"))
    )
    assert _common(handshake(server, b"a.test", tls12=tls12)[0]) == ["a.test"]
    assert _common(handshake(server, b"WWW.B.test", tls12=tls12)[0]) == [
        "b.test",
        "www.b.test",
    ]
    # No SNI: the first name's certificate.
    assert _common(handshake(server, None, tls12=tls12)[0]) == ["a.test"]
    assert handshake(server, b"a.test", [b"http/1.1"])[1] == b"http/1.1"


@pytest.mark.parametrize("tls12", [False, True])
def test_unknown_name_fails_cleanly(ca: trustme.CA, tls12: bool) -> None:
    server = SNIServerTLS()
    server.install(["a.test"], *_load(ca.issue_cert("a.test")))
    with pytest.raises(SSL.Error):
        handshake(server, b"c.test", tls12=tls12)
    with pytest.raises(SSL.Error):
        handshake(server, b"c.test", [b"http/1.1"], tls12=tls12)


def _challenge(name: str) -> tuple[object, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, challenge_certificate(name, b"\x01" * 32, key)


def test_challenge_only_with_acme_alpn(ca: trustme.CA) -> None:
    server = SNIServerTLS()
    server.install(["a.test"], *_load(ca.issue_cert("a.test")))
    key, challenge = _challenge("a.test")
    server.setChallenge("a.test", key, challenge)
    seen, protocol = handshake(server, b"a.test", [ACME_TLS_1])
    assert protocol == ACME_TLS_1
    assert seen == challenge
    # An ordinary client still gets the real certificate.
    seen, protocol = handshake(server, b"a.test", [b"h2", b"http/1.1"])
    assert protocol == b"http/1.1"
    assert _common(seen) == ["a.test"]
    # A name with no certificate yet: the challenge is served to the
    # validator, and nothing at all to anyone else.
    key, challenge = _challenge("new.test")
    server.setChallenge("new.test", key, challenge)
    assert handshake(server, b"new.test", [ACME_TLS_1]) == (challenge, ACME_TLS_1)
    with pytest.raises(SSL.Error):
        handshake(server, b"new.test", [b"http/1.1"])
    with pytest.raises(SSL.Error):
        handshake(server, b"new.test")
    server.clearChallenge("new.test")
    with pytest.raises(SSL.Error):
        handshake(server, b"new.test", [ACME_TLS_1])


def test_reload_keeps_old_on_failure(ca: trustme.CA, tmp_path) -> None:
    first = ca.issue_cert("a.test")
    certPath, keyPath = tmp_path / "a.pem", tmp_path / "a.key"
    first.cert_chain_pems[0].write_to_path(str(certPath))
    first.private_key_pem.write_to_path(str(keyPath))
    server = SNIServerTLS()
    server.addFiles(CertificateFiles(("a.test",), str(certPath), str(keyPath)))
    before = handshake(server, b"a.test")[0]
    second = ca.issue_cert("a.test")
    second.cert_chain_pems[0].write_to_path(str(certPath))
    with pytest.raises(ConfigError, match="does not match"):
        server.reload()
    assert handshake(server, b"a.test")[0] == before
    second.private_key_pem.write_to_path(str(keyPath))
    server.reload()
    after = handshake(server, b"a.test")[0]
    assert after != before
    assert after.not_valid_after_utc > datetime.datetime(
        2000, 1, 1, tzinfo=datetime.timezone.utc
    )
    assert server.expiries()["a.test"] == after.not_valid_after_utc


def test_single_certificate_expiry_by_name(ca: trustme.CA, tmp_path) -> None:
    from clerkproxy._tls import ReloadableServerTLS

    leaf = ca.issue_cert("a.test", "b.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    tls = ReloadableServerTLS(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    expiry = tls.expiries()
    assert sorted(expiry) == ["a.test", "b.test"]
    assert expiry["a.test"] > datetime.datetime.now(datetime.timezone.utc)
