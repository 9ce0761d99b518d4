"""Configuration values: validation, derived bytes, and the secret's privacy."""

from __future__ import annotations

import copy
import pickle

import pytest

from clerkproxy import ConfigError, ProxyConfig, SecretKey

KEY = "sk_live_Zm9vYmFyYmF6cXV4"


def make(**overrides: object) -> ProxyConfig:
    settings: dict[str, object] = {
        "proxy_url": "https://app.test/__clerk",
        "secret_key": KEY,
    }
    settings.update(overrides)
    return ProxyConfig(**settings)  # type: ignore[arg-type]


def test_derived_values() -> None:
    config = make(
        proxy_url="https://app.test/__clerk/", fapi_url="https://fapi.test:8443/base/"
    )
    assert config.prefix == b"/__clerk"
    assert config.proxy_url_header == b"https://app.test/__clerk/"
    assert config.fapi_host == "fapi.test"
    assert config.fapi_port == 8443
    assert config.fapi_host_header == b"fapi.test:8443"
    assert config.fapi_base_path == b"/base"
    default = make()
    assert default.fapi_host_header == b"frontend-api.clerk.dev"
    assert default.fapi_port == 443


def test_root_proxy_url_owns_everything() -> None:
    assert make(proxy_url="https://clerk.app.test").prefix == b""
    assert make(proxy_url="https://clerk.app.test/").prefix == b""


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"proxy_url": "/__clerk"}, "proxy URL"),
        ({"proxy_url": "ftp://app.test/__clerk"}, "proxy URL"),
        ({"proxy_url": "https:///__clerk"}, "proxy URL"),
        ({"proxy_url": "https://app.test/__clerk?x=1"}, "query"),
        ({"proxy_url": "https://app.test/__cl erk"}, "proxy URL"),
        ({"proxy_url": "https://app.test:99999/"}, "proxy URL"),
        ({"fapi_url": "http://frontend-api.clerk.dev"}, "https"),
        ({"fapi_url": "frontend-api.clerk.dev"}, "FAPI URL"),
        ({"secret_key": ""}, "CLERK_SECRET_KEY"),
        ({"secret_key": "pk_live_abc"}, "sk_live_"),
        ({"secret_key": "sk_live_a b"}, "spaces"),
        ({"secret_key": "sk_test_abcdef"}, "development"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "--trusted-proxy"),
        ({"max_body_size": -1}, "--max-body-size"),
        ({"connect_timeout": 0}, "--connect-timeout"),
        ({"upstream_timeout": -5}, "--upstream-timeout"),
        ({"body_timeout": 0}, "--body-timeout"),
        ({"upstream_read_timeout": -1}, "--upstream-read-timeout"),
        ({"send_timeout": 0}, "--send-timeout"),
    ],
)
def test_bad_values_name_the_option(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as caught:
        make(**overrides)
    secret = overrides.get("secret_key")
    if isinstance(secret, str) and len(secret) > 8:
        assert secret not in str(caught.value)


def test_the_secret_never_shows() -> None:
    config = make()
    for text in (
        repr(config),
        str(config),
        f"{config.secret_key}",
        repr(config.secret_key),
    ):
        assert KEY not in text
    assert config.secret_key.headerValue() == KEY.encode()
    with pytest.raises(TypeError):
        pickle.dumps(config.secret_key)
    with pytest.raises(AttributeError):
        config.secret_key._value = b"x"  # type: ignore[misc]
    assert copy.copy(config) == config


def test_secret_key_accepts_bytes_and_strips_newlines() -> None:
    assert make(secret_key=(KEY + "\n").encode()).secret_key == SecretKey(KEY.encode())


def test_config_is_frozen() -> None:
    config = make()
    with pytest.raises(AttributeError):
        config.proxy_url = "https://other.test"  # type: ignore[misc]
