"""The C{clerkproxy} command: C{clerkproxy check} (the proxy itself runs
under C{twistd -n clerkproxy})."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """\
usage: clerkproxy check [options]

  check   test a deployment: configuration, DNS, TCP and TLS to FAPI, FAPI
          accepting the proxy URL and key, and the public URL's
          /v1/proxy-health.  Takes the options of `twistd clerkproxy`, plus
          --public URL and --domain-id dmn_...; `clerkproxy check --help`.

Run the proxy itself with: twistd -n clerkproxy --help
"""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        raise SystemExit(0 if args else 2)
    if args[0] == "check":
        from ._check import main as check

        raise SystemExit(check(args[1:]))
    sys.stderr.write(f"clerkproxy: unknown command {args[0]!r}\n\n{USAGE}")
    raise SystemExit(2)


if __name__ == "__main__":
    main()
