"""The documentation's code and commands are the code's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest_twisted
from conftest import SECRET, parse_response, raw_request, reactor
from twisted.internet.endpoints import serverFromString

DOCS = Path(__file__).resolve().parent.parent / "docs"
README = DOCS.parent / "README.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.DOTALL)


def test_embedding_example_builds_a_streaming_site(monkeypatch: Any) -> None:
    monkeypatch.setenv("CLERK_SECRET_KEY", SECRET)
    namespace: dict[str, Any] = {"__name__": "embed"}
    exec(python_blocks(DOCS / "embedding.md")[0], namespace)
    site, proxy = namespace["make_site"](reactor)
    from clerkproxy import FrontendAPIProxy, StreamingSite

    assert isinstance(site, StreamingSite) and isinstance(proxy, FrontendAPIProxy)
    assert site.resource.children[b"__clerk"] is proxy
    assert proxy.config.prefix == b"/__clerk"


def test_testing_example_in_the_embedding_guide_runs() -> None:
    exec(python_blocks(DOCS / "embedding.md")[2], {"__name__": "example"})


def test_readme_has_exactly_the_two_commands() -> None:
    text = README.read_text()
    for marker in ("<!-- run-command -->", "<!-- test-command -->"):
        block = text.split(marker, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
        assert len(block.strip().splitlines()) == 1
    assert "twistd -n clerkproxy" in text.split("<!-- run-command -->")[1]
    assert "pytest" in text.split("<!-- test-command -->")[1]


def test_every_cli_option_is_documented() -> None:
    from clerkproxy.tap import Options

    doc = (DOCS / "configuration.md").read_text()
    names = [p[0] for p in Options.optParameters] + ["port", "trusted-proxy"]
    for name in names:
        assert f"`--{name}" in doc, name
    for variable in ("CLERK_SECRET_KEY", "CLERK_PROXY_URL", "CLERK_FAPI"):
        assert variable in doc


@pytest_twisted.ensureDeferred
async def test_haproxy_endpoint_gives_the_real_client_address(
    make_proxy: Any, fapi: Any
) -> None:
    """The PROXY protocol prefix documented in configuration.md."""
    proxy = make_proxy()
    endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
    port = await endpoint.listen(proxy.site)
    try:
        data = await raw_request(
            port.getHost().port,
            b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 443\r\n"
            b"POST /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            b"Content-Length: 3\r\n\r\nabc",
        )
    finally:
        await port.stopListening()
    assert parse_response(data)[0] == 200
    assert fapi.header("X-Forwarded-For") == ["198.51.100.7"]
    assert fapi.seen[-1]["body"] == "abc"
