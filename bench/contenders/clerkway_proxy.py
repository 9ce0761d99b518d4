"""
clerkway (PyPI) as a contender: its FastAPI router, unmodified, under
uvicorn, one process.  Two things are pointed elsewhere, as a user would:
the FAPI origin (clerkway keeps it in a module constant) goes to the
benchmark's upstream, and httpx trusts the test CA (``SSL_CERT_FILE``).
Usage: python clerkway_proxy.py PORT FAPI_URL CA_PEM
"""

import os
import sys

port, fapi, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["SSL_CERT_FILE"] = ca  # read by httpx when it builds its client

import clerkway.proxy  # noqa: E402
import uvicorn  # noqa: E402
from clerkway import ClerkProxyConfig, create_clerk_proxy_router  # noqa: E402
from fastapi import FastAPI  # noqa: E402

clerkway.proxy.CLERK_FRONTEND_API = fapi

app = FastAPI(lifespan=clerkway.proxy.clerk_proxy_lifespan)
app.include_router(
    create_clerk_proxy_router(
        ClerkProxyConfig(secret_key=os.environ["CLERK_SECRET_KEY"])
    )
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
