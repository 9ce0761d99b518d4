"""
A straightforward aiohttp reverse proxy for the benchmark: one pooled
ClientSession, streaming both ways, the same three injected headers.
Usage: python aiohttp_proxy.py PORT FAPI_URL CA_PEM
"""

import os
import ssl
import sys

import aiohttp
from aiohttp import web

HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


async def make_app(fapi: str, ca: str) -> web.Application:
    context = ssl.create_default_context(cafile=ca)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, ssl=context),
        auto_decompress=False,
    )
    proxy_url = os.environ["CLERK_PROXY_URL"]
    secret = os.environ["CLERK_SECRET_KEY"]

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.raw_path
        if not (path == "/__clerk" or path.startswith(("/__clerk/", "/__clerk?"))):
            return web.Response(status=404)
        target = fapi + (path[len("/__clerk") :] or "/")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["Clerk-Proxy-Url"] = proxy_url
        headers["Clerk-Secret-Key"] = secret
        headers["X-Forwarded-For"] = request.remote or ""
        data = request.content if request.body_exists else None
        async with session.request(
            request.method,
            target,
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP:
                    response.headers.add(name, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(65536):
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handle)

    async def close(app: web.Application) -> None:
        await session.close()

    app.on_cleanup.append(close)
    return app


if __name__ == "__main__":
    port, fapi, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    web.run_app(
        make_app(fapi, ca), host="127.0.0.1", port=port, access_log=None, print=None
    )
