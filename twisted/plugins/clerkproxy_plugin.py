"""
twistd plugin for clerkproxy.

Deliberately tiny: twistd imports every plugin module to list them, so this
file imports nothing of ours and never the reactor; C{clerkproxy.tap} is
loaded only when C{twistd clerkproxy} runs.
"""

from twisted.application.service import ServiceMaker

clerkproxy = ServiceMaker(
    "clerkproxy",
    "clerkproxy.tap",
    "Clerk Frontend API proxy: /__clerk/* to FAPI over verified, pooled TLS.",
    "clerkproxy",
)
