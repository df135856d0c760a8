"""Who is asking: bearer tokens, the login cookie, CSRF tokens and the security headers.

Two tokens: an admin token (every route) and an optional read-only token (GET routes; a
POST with it is refused with 403). A request proves one with `Authorization: Bearer ...`,
or with the cookie the login form sets. The cookie holds no token: it holds the role, an
expiry and an HMAC of both keyed by a hash of that role's token, so it is worthless once
the token changes and the server keeps no sessions. Forms posted with the cookie carry a
CSRF token derived from the cookie the same way (and the cookie is SameSite=Strict).
Tokens are compared in constant time and appear in no page, header or log line.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from dataclasses import dataclass

from starlette.requests import HTTPConnection

from durable.errors import ConfigurationError

COOKIE = "durable_session"
SESSION_SECONDS = 12 * 3600
ADMIN = "admin"
READ = "read"

#: Sent with every response.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "object-src 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

_MIN_TOKEN = 16


def _key(token: str) -> bytes:
    return hashlib.sha256(b"durable-session\x00" + token.encode()).digest()


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Auth:
    """The tokens of one admin app, and the checks made with them."""

    token: str | None
    read_only_token: str | None
    insecure_no_auth: bool = False

    def __post_init__(self) -> None:
        if self.insecure_no_auth:
            if self.token is not None or self.read_only_token is not None:
                raise ConfigurationError("insecure_no_auth=True takes no tokens")
            return
        if self.token is None:
            raise ConfigurationError(
                "admin_app needs token=... (and optionally read_only_token=...); "
                "insecure_no_auth=True is for a dashboard bound to loopback only"
            )
        for name, value in (("token", self.token), ("read_only_token", self.read_only_token)):
            if value is not None and (not isinstance(value, str) or len(value) < _MIN_TOKEN):
                raise ConfigurationError(f"{name} must be a string of at least {_MIN_TOKEN} chars")
        if self.token == self.read_only_token:
            raise ConfigurationError("token and read_only_token must differ")

    def _tokens(self) -> list[tuple[str, str]]:
        found = [(ADMIN, self.token or "")]
        if self.read_only_token is not None:
            found.append((READ, self.read_only_token))
        return found

    def role_of_token(self, given: str) -> str | None:
        """The role a presented token grants, comparing with every token in constant time."""
        role = None
        for name, token in self._tokens():
            if hmac.compare_digest(given.encode(), token.encode()) and token:
                role = name
        return role

    def role(self, conn: HTTPConnection) -> tuple[str | None, str]:
        """(role, how): the role the request proves and whether by `bearer`, `cookie` or
        `none` (insecure_no_auth on loopback)."""
        if self.insecure_no_auth:
            server = conn.scope.get("server")
            return (ADMIN if server and is_loopback(server[0]) else None), "none"
        header = conn.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value:
            return self.role_of_token(value.strip()), "bearer"
        cookie = conn.cookies.get(COOKIE)
        if cookie:
            return self.role_of_cookie(cookie), "cookie"
        return None, "none"

    # -- the login cookie ------------------------------------------------------------------

    def _token_of(self, role: str) -> str | None:
        return dict(self._tokens()).get(role)

    def cookie_for(self, role: str, now: float | None = None) -> str:
        """A session cookie value for `role`, valid for SESSION_SECONDS."""
        token = self._token_of(role)
        assert token
        expires = int((now or time.time()) + SESSION_SECONDS)
        body = f"{role}.{expires}"
        sig = hmac.new(_key(token), body.encode(), hashlib.sha256).hexdigest()
        return f"{body}.{sig}"

    def role_of_cookie(self, cookie: str, now: float | None = None) -> str | None:
        """The role a session cookie proves, or None (forged, expired, or its token changed)."""
        role, _, rest = cookie.partition(".")
        expires, _, sig = rest.partition(".")
        token = self._token_of(role)
        if not token or not expires.isdigit():
            return None
        want = hmac.new(_key(token), f"{role}.{expires}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, sig):
            return None
        return role if int(expires) > (now or time.time()) else None

    def csrf_for(self, cookie: str) -> str:
        """The CSRF token that forms posted with `cookie` must carry."""
        role = cookie.partition(".")[0]
        token = self._token_of(role) or ""
        return hmac.new(_key(token), b"csrf\x00" + cookie.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, conn: HTTPConnection, given: str | None) -> bool:
        """True when `given` is the CSRF token of the request's session cookie."""
        cookie = conn.cookies.get(COOKIE)
        if not cookie or not given:
            return False
        return hmac.compare_digest(self.csrf_for(cookie), given)
