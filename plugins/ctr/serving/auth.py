"""Bearer-token checks for the scoring API and the admin (hot swap) endpoint. Tokens are never logged."""

from __future__ import annotations

import hmac
from typing import Any

from ctr.serving.validation import RequestError

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def bearer(headers: dict[bytes, bytes]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    auth = headers.get(b"authorization")
    if auth is None:
        return None
    scheme, _, token = auth.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip()


def check_token(headers: dict[bytes, bytes], token: bytes, what: str = "bearer token") -> None:
    """Constant-time comparison; 401 when missing or wrong (the same answer for both)."""
    got = bearer(headers)
    # compare_digest runs in time independent of where the strings differ
    if got is None or not hmac.compare_digest(got, token):
        raise RequestError(401, f"missing or wrong {what}; send 'Authorization: Bearer <token>'")


def check_admin(scope: dict[str, Any], headers: dict[bytes, bytes], admin_token: bytes) -> None:
    """With CTR_ADMIN_TOKEN set, the admin token is required; without it, loopback clients only."""
    if admin_token:
        check_token(headers, admin_token, "admin token")
        return
    client = (scope.get("client") or ("", 0))[0]
    if client not in _LOOPBACK:
        raise RequestError(403, "admin endpoint is loopback-only when CTR_ADMIN_TOKEN is unset")
