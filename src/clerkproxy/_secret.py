"""
A secret key that cannot leak by accident.

The value is reachable only through L{SecretKey.headerValue}; C{repr},
C{str}, logging and exception formatting all show a fixed redacted marker.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["SecretKey"]

_REDACTED = "SecretKey(<redacted>)"


class SecretKey:
    """
    The Clerk instance secret key (C{sk_live_...}).

    Deliberately not an attrs class: attrs would generate a C{repr}, and
    pickling or copying the key is never what anyone wants.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        object.__setattr__(self, "_value", value)

    def headerValue(self) -> bytes:
        """The raw bytes to put in the C{Clerk-Secret-Key} header."""
        value: bytes = object.__getattribute__(self, "_value")
        return value

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("SecretKey is immutable")

    def __repr__(self) -> str:
        return _REDACTED

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return _REDACTED

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretKey):
            return NotImplemented
        return self.headerValue() == other.headerValue()

    def __hash__(self) -> int:
        return hash((SecretKey, self.headerValue()))

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretKey cannot be pickled")
