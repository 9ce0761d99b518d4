"""
Many sites in one process: the C{--config} file, routing each request by
its host name to its site, and the plain listener's redirect to HTTPS.

A site is one Clerk proxy URL with its own secret key, optionally its own
application origin, and its own certificate (files, or ACME).  Each site
has its own L{FrontendAPIProxy}, so the C{Clerk-Proxy-Url} and
C{Clerk-Secret-Key} a request carries upstream are always its site's: a
request reaches a site's proxy only when its C{Host} is one of that site's
names, and a host that is no site's gets C{421 Misdirected Request}
before any upstream is involved.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ._acme import (
    CHALLENGES,
    HTTP_01_PREFIX,
    LETS_ENCRYPT,
    AcmeSettings,
    Http01Responses,
)
from ._config import ConfigError, ProxyConfig
from ._errors import respond_error
from ._sni import CertificateFiles, SNIServerTLS, normalise
from .interfaces import IRequestBodyReceiver, IStreamingResource

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "EdgeRoot",
    "FileConfig",
    "Site",
    "SiteSpec",
    "load_config",
    "read_sites",
    "request_host",
]


@attrs.frozen
class Site:
    """One site being served: its name, its host names, its proxy."""

    name: str
    hosts: tuple[str, ...]
    config: ProxyConfig


@attrs.frozen
class SiteSpec:
    """
    One site from the config file, before it is turned into resources.

    @ivar name: What metrics and the access log call it (its first host).
    @ivar hosts: The host names it answers (C{Host}, C{:authority}, SNI).
    @ivar secret: Its secret key, as read from its file or variable.
    @ivar acme: Whether its certificate comes from ACME.
    """

    name: str
    hosts: tuple[str, ...]
    proxy_url: str
    secret: str = attrs.field(repr=False)
    app: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    acme: bool = False


#: The config file's top-level keys that are also command-line options,
#: with the option each one is.
GLOBAL_KEYS: dict[str, str] = {
    "port": "--port",
    "fapi": "--fapi",
    "fapi_ca": "--fapi-ca",
    "trusted_proxy": "--trusted-proxy",
    "admin_port": "--admin-port",
    "access_log": "--access-log",
    "redirect_http": "--redirect-http",
}
ACME_KEYS: dict[str, str] = {
    "email": "--acme-email",
    "directory": "--acme-directory",
    "ca": "--acme-ca",
    "dir": "--acme-dir",
    "challenge": "--acme-challenge",
}
SITE_KEYS = frozenset(
    {
        "hosts",
        "proxy_url",
        "secret_key_file",
        "secret_key_env",
        "app",
        "tls_cert",
        "tls_key",
        "acme",
    }
)
#: Command-line options that describe one site: with C{--config}, each
#: site says these in the file instead.
SITE_OPTIONS = (
    "proxy-url",
    "secret-key-file",
    "app",
    "tls-cert",
    "tls-key",
    "acme-domain",
)


@attrs.frozen
class FileConfig:
    """
    What a C{--config} file says.

    @ivar options: Top-level settings, by the command-line option they are
        (C{"--fapi"}: value), for the conflict check against the flags.
    """

    path: str
    sites: tuple[SiteSpec, ...]
    options: Mapping[str, Any]


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string")
    return value


def _strings(value: Any, where: str, empty: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not (value or empty):
        raise ConfigError(f"{where} must be a string or a list of strings")
    return [_string(v, where) for v in value]


def _relative(base: str, path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(base)), path)


def load_config(path: str, environ: Mapping[str, str]) -> FileConfig:
    """
    Read and check a C{--config} file.  Relative paths in it are relative
    to the file.  A secret key is read from the file or variable the site
    names; the config file itself never holds one.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path} is not valid TOML: {e}") from None
    where = f"--config {path}"
    options: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("site", "acme"):
            continue
        if key not in GLOBAL_KEYS:
            known = ", ".join(sorted([*GLOBAL_KEYS, "acme", "site"]))
            raise ConfigError(f"{where}: unknown key {key!r} (known: {known})")
        if key in ("port", "trusted_proxy"):
            value = _strings(value, f"{where}: {key}", key == "trusted_proxy")
        elif key == "redirect_http":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: redirect_http must be true or false")
        else:
            value = _string(value, f"{where}: {key}")
            if key in ("fapi_ca", "access_log") and value != "-":
                value = _relative(path, value)
        options[GLOBAL_KEYS[key]] = value
    acme = data.get("acme", {})
    if not isinstance(acme, dict):
        raise ConfigError(f"{where}: [acme] must be a table")
    for key, value in acme.items():
        if key not in ACME_KEYS:
            known = ", ".join(sorted(ACME_KEYS))
            raise ConfigError(f"{where}: unknown key acme.{key} (known: {known})")
        value = _string(value, f"{where}: acme.{key}")
        if key in ("ca", "dir"):
            value = _relative(path, value)
        options[ACME_KEYS[key]] = value
    raw = data.get("site")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{where} describes no site: add at least one [[site]] table "
            "with proxy_url and secret_key_file or secret_key_env"
        )
    sites = [_site(path, i, table, environ) for i, table in enumerate(raw)]
    seen: dict[str, str] = {}
    for site in sites:
        for host in site.hosts:
            if host in seen:
                raise ConfigError(
                    f"{where}: host {host} belongs to two sites "
                    f"({seen[host]} and {site.name})"
                )
            seen[host] = site.name
    return FileConfig(path, tuple(sites), options)


def _site(path: str, index: int, table: Any, environ: Mapping[str, str]) -> SiteSpec:
    where = f"--config {path}: site {index + 1}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table ([[site]])")
    if "secret_key" in table:
        raise ConfigError(
            f"{where}: never put the key in the file; name a file holding it "
            "(secret_key_file) or a variable (secret_key_env)"
        )
    unknown = sorted(set(table) - SITE_KEYS)
    if unknown:
        known = ", ".join(sorted(SITE_KEYS))
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {known})")
    proxyURL = _string(table.get("proxy_url"), f"{where}: proxy_url")
    urlHost = urlsplit(proxyURL).hostname
    hosts = table.get("hosts")
    if hosts is None:
        if not urlHost:
            raise ConfigError(f"{where}: proxy_url {proxyURL!r} has no host")
        names = [urlHost]
    else:
        names = _strings(hosts, f"{where}: hosts")
    names = [normalise(n) for n in names]
    name = names[0]
    where = f"--config {path}: site {name}"
    keyFile, keyEnv = table.get("secret_key_file"), table.get("secret_key_env")
    if bool(keyFile) == bool(keyEnv):
        raise ConfigError(
            f"{where}: give exactly one of secret_key_file (a file holding the "
            "key) or secret_key_env (the name of a variable holding it)"
        )
    if keyFile:
        keyPath = _relative(path, _string(keyFile, f"{where}: secret_key_file"))
        try:
            with open(keyPath, encoding="utf-8") as f:
                secret = f.read()
        except OSError as e:
            raise ConfigError(
                f"{where}: cannot read secret_key_file {keyPath}: {e.strerror}"
            ) from None
    else:
        variable = _string(keyEnv, f"{where}: secret_key_env")
        secret = environ.get(variable, "")
        if not secret.strip():
            raise ConfigError(f"{where}: the variable {variable} is not set")
    cert, key = table.get("tls_cert"), table.get("tls_key")
    if bool(cert) != bool(key):
        raise ConfigError(f"{where}: tls_cert and tls_key go together")
    acme = table.get("acme", False)
    if not isinstance(acme, bool):
        raise ConfigError(f"{where}: acme must be true or false")
    if acme and cert:
        raise ConfigError(f"{where}: choose tls_cert/tls_key or acme = true")
    app = table.get("app")
    return SiteSpec(
        name=name,
        hosts=tuple(names),
        proxy_url=proxyURL,
        secret=secret,
        app=_string(app, f"{where}: app") if app is not None else None,
        tls_cert=_relative(path, cert) if cert else None,
        tls_key=_relative(path, key) if key else None,
        acme=acme,
    )


def check_conflicts(
    file: FileConfig, given: Mapping[str, Any], siteOptions: Sequence[str]
) -> None:
    """
    Refuse flags that disagree with the file: a per-site option (which the
    file's sites say instead), or a global one set to another value.

    @param given: The command-line options actually given, by flag.
    @param siteOptions: The per-site flags given on the command line.
    """
    for option in siteOptions:
        raise ConfigError(
            f"--{option} conflicts with --config {file.path}: with a config "
            "file, each [[site]] says its own proxy_url, secret key, app, "
            "certificate and acme"
        )
    for flag, value in file.options.items():
        if flag in given and given[flag] != value:
            raise ConfigError(
                f"{flag} {given[flag]!r} conflicts with --config {file.path}, "
                f"which says {value!r}: give it in one place"
            )


def _acme_settings(
    options: Mapping[str, Any], environ: Mapping[str, str], domains: list[str]
) -> AcmeSettings:
    path = options.get("acme-dir")
    if not path:
        state = environ.get("STATE_DIRECTORY", "").split(":")[0]
        path = os.path.join(state, "acme") if state else "clerkproxy-acme"
    ca = options.get("acme-ca") or None
    if ca is not None:
        try:
            open(ca, "rb").close()
        except OSError as e:
            raise ConfigError(f"cannot read --acme-ca {ca}: {e.strerror}") from None
    challenge = options.get("acme-challenge")
    challenges: tuple[str, ...] = CHALLENGES
    if challenge:
        if challenge not in CHALLENGES:
            raise ConfigError(
                f"--acme-challenge must be tls-alpn-01 or http-01, got {challenge!r}"
            )
        challenges = (challenge,)
    directory = options.get("acme-directory") or LETS_ENCRYPT
    if not directory.startswith("https://"):
        raise ConfigError(f"--acme-directory must be an https URL, got {directory!r}")
    names = []
    for domain in domains:
        name = normalise(domain)
        if not name or "*" in name or "/" in name or ":" in name:
            raise ConfigError(f"--acme-domain {domain!r} is not a host name")
        names.append(name)
    return AcmeSettings(
        domains=tuple(dict.fromkeys(names)),
        path=os.path.abspath(path),
        directory=directory,
        email=options.get("acme-email") or None,
        ca=ca,
        challenges=challenges,
    )


def is_tls_port(description: str, tls: object | None) -> bool:
    """Whether a C{--port} terminates TLS (see L{server_endpoint})."""
    if description.startswith("ssl:"):
        return True
    return tls is not None and (
        description.isdigit() or description.startswith(("tls:", "haproxy:"))
    )


@attrs.define
class MultiSite:
    """
    What C{--config}, C{--acme-*} and C{--redirect-http} add to the
    single-site settings (see L{read_sites}).

    @ivar options: The options with the file's global settings merged in.
    @ivar tls: The SNI listener's certificates, when any site has its own
        certificate or ACME is on.
    """

    options: dict[str, Any]
    file: FileConfig | None = None
    tls: SNIServerTLS | None = None
    acme: AcmeSettings | None = None

    def sites(self, config: ProxyConfig) -> tuple[Site, ...]:
        """Each file site's own L{ProxyConfig}, from the first's settings."""
        if self.file is None:
            return ()
        return tuple(
            Site(
                spec.name,
                spec.hosts,
                attrs.evolve(
                    config,
                    proxy_url=spec.proxy_url,
                    secret_key=spec.secret,
                    app_url=spec.app,
                ),
            )
            for spec in self.file.sites
        )

    def redirect(
        self, ports: Sequence[str], tls: object | None, trusted: Sequence[object]
    ) -> bool:
        """
        C{--redirect-http} as given, or by default: on when there is a TLS
        listener and a plain one, and no C{--trusted-proxy} (a plain
        listener behind a trusted proxy is that proxy's TLS, already done).
        """
        explicit = self.options.get("redirect-http")
        if explicit is not None:
            return bool(explicit)
        kinds = {is_tls_port(d, tls) for d in ports}
        return kinds == {True, False} and not trusted


def read_sites(options: Mapping[str, Any], environ: Mapping[str, str]) -> MultiSite:
    """
    Read C{--config} (if given) and the ACME options; check that the file
    and the flags do not disagree.
    """
    merged = dict(options)
    configPath = options.get("config")
    if not configPath:
        domains = list(options.get("acme-domain") or [])
        if not domains:
            return MultiSite(merged)
        if options.get("tls-cert"):
            raise ConfigError(
                "--tls-cert and --acme-domain cannot be combined for one site: "
                "use one, or --config with a site for each"
            )
        return MultiSite(
            merged, None, SNIServerTLS(), _acme_settings(merged, environ, domains)
        )
    file = load_config(configPath, environ)
    given: dict[str, Any] = {}
    for flag in [*GLOBAL_KEYS.values(), *ACME_KEYS.values()]:
        value = options.get(flag[2:])
        if value is not None and value != []:
            given[flag] = list(value) if isinstance(value, list) else value
    check_conflicts(file, given, [o for o in SITE_OPTIONS if options.get(o)])
    for flag, value in file.options.items():
        merged[flag[2:]] = value
    tls: SNIServerTLS | None = None
    acmeNames: list[str] = []
    for spec in file.sites:
        if spec.tls_cert and spec.tls_key:
            tls = tls or SNIServerTLS()
            tls.addFiles(
                CertificateFiles(
                    spec.hosts,
                    spec.tls_cert,
                    spec.tls_key,
                    f"--config site {spec.name}: tls_cert",
                    f"--config site {spec.name}: tls_key",
                )
            )
        if spec.acme:
            acmeNames.extend(spec.hosts)
    acme = None
    if acmeNames:
        tls = tls or SNIServerTLS()
        acme = _acme_settings(merged, environ, acmeNames)
    return MultiSite(merged, file, tls, acme)


# -- serving ------------------------------------------------------------


def request_host(request: Request) -> str | None:
    """The host name a request is for (C{Host}, which carries HTTP/2's
    C{:authority}), without port, lower case; L{None} if it has none."""
    raw = request.requestHeaders.getRawHeaders(b"host")
    if not raw or len(raw) != 1:
        return None
    host = raw[0].decode("ascii", "replace").strip()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1].lower() if end > 0 else None
    return normalise(host.rpartition(":")[0] if ":" in host else host) or None


def _redirect(request: Request) -> None:
    host = request.requestHeaders.getRawHeaders(b"host")
    if not host or len(host) != 1 or request.uri[:1] != b"/":
        respond_error(request, 400, "proxy_bad_request")
        return
    name = request_host(request)
    assert name is not None
    request.setResponseCode(308)
    request.setHeader(b"Location", b"https://" + name.encode("ascii") + request.uri)
    request.setHeader(b"Content-Length", b"0")
    request.setHeader(b"Cache-Control", b"no-store")
    request.finish()


@implementer(IStreamingResource)
class EdgeRoot(Resource):
    """
    The root of an edge box with more than one job:

      1. ACME C{http-01} answers, on any host, before anything else;
      2. with C{redirect}, a C{308} to the same URL on https for every
         other request that did not arrive over TLS;
      3. with C{sites}, the site whose name is the request's host (C{421}
         when it is none of them), else the single C{default} root.

    @ivar sites: Each host name's site name and root resource.
    """

    isLeaf = True

    def __init__(
        self,
        default: IResource | None = None,
        sites: Mapping[str, tuple[str, IResource]] | None = None,
        http01: Http01Responses | None = None,
        redirect: bool = False,
    ) -> None:
        Resource.__init__(self)
        self.default = default
        self.sites = dict(sites or {})
        self.http01 = http01
        self.redirect = redirect
        metrics = getattr(default, "metrics", None)
        if metrics is None and self.sites:
            metrics = getattr(next(iter(self.sites.values()))[1], "metrics", None)
        self.metrics = metrics

    def _route(self, request: Request) -> IResource | None:
        """The resource for C{request}, or L{None} when answered here."""
        if self.http01 is not None and request.path.startswith(HTTP_01_PREFIX):
            body = self.http01.render(request)
            request.setHeader(b"Content-Length", b"%d" % len(body))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()
            return None
        resource = self.default
        if self.sites:
            host = request_host(request)
            site = self.sites.get(host) if host is not None else None
            if site is None:
                respond_error(request, 421, "misdirected_request")
                return None
            request.siteName = site[0]  # type: ignore[attr-defined]
            resource = site[1]
        if self.redirect and not request.isSecure():
            _redirect(request)
            return None
        return resource

    def render(self, request: Request) -> object:
        resource = self._route(request)
        if resource is None:
            return NOT_DONE_YET
        return resource.render(request)

    def renderStreaming(  # type: ignore[override]
        self, request: Request, length: int | None
    ) -> IRequestBodyReceiver | None:
        resource = self._route(request)
        if resource is None:
            return None
        if IStreamingResource.providedBy(resource):
            receiver: IRequestBodyReceiver | None = resource.renderStreaming(
                request, length
            )
            return receiver
        respond_error(request, 404, "not_found")
        return None
