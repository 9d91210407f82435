"""The rollout server's front door: who may call it, how much they may send, how errors look.

Checked on the raw request (ASGI), before any route reads or parses the body:
* no token (loopback mode): the Host header must name a loopback address, and a browser's
  Origin header (if any) too, so a web page the user visits reaches the server neither
  through DNS rebinding nor with a cross-site POST;
* with a token: every route but GET /health, /version and the schema needs
  `Authorization: Bearer TOKEN` (compared in constant time);
* body size: Content-Length within the route's limit (chunks: the chunk bound; the rest:
  --max-request-bytes); a body without Content-Length is refused.
Every error is one line of JSON, {"detail": "..."}; tracebacks go to the server's log only.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import urllib.parse
from typing import Any

from tunix_sglang.errors import UserError
from tunix_sglang.protocol import AUTH_HEADER, BEARER, PUBLIC_PATHS, TOKEN_ENV, UPLOADS

logger = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
_DETAIL_CHARS = 400


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: assume it may resolve beyond loopback


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a shared token (UserError)."""
    if not is_loopback(host) and not token:
        raise UserError(
            f"serve --host {host}: listening beyond loopback needs a shared token; pass "
            f"--token or set {TOKEN_ENV} (or use --host 127.0.0.1)"
        )


def check_token(token: str, where: str) -> None:
    """A shared token must be >= 16 printable ASCII characters without spaces (UserError)."""
    if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
        raise UserError(
            f"{where}: the server token must be at least {MIN_TOKEN_CHARS} printable ASCII "
            "characters without spaces; make one with: python -c \"import secrets; "
            "print(secrets.token_urlsafe(24))\""
        )


def host_of(value: str) -> str:
    """The host name in a Host header value (`name`, `name:port`, `[v6]:port`); "" for a
    value that is none of these (urlsplit raises on an unclosed `[`)."""
    try:
        return urllib.parse.urlsplit("//" + value).hostname or ""
    except ValueError:
        return ""


def one_line(text: Any) -> str:
    """An error detail as one bounded line (never a traceback)."""
    s = " ".join(str(text).split())
    return s if len(s) <= _DETAIL_CHARS else s[:_DETAIL_CHARS - 3] + "..."


async def send_error(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": one_line(detail)}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: origin, token and body-size checks before the app sees a request."""

    def __init__(self, app, *, token: str | None, max_request_bytes: int,
                 max_chunk_bytes: int):
        self.app = app
        self.token = token.encode() if token else None
        self.max_request_bytes = max_request_bytes
        self.max_chunk_bytes = max_chunk_bytes

    def problem(self, scope) -> tuple[int, str] | None:
        headers: dict[bytes, bytes] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k, v)  # the first of repeated headers
        method, path = scope["method"], scope["path"]
        if self.token is None:
            host = headers.get(b"host", b"").decode("latin-1")
            if not is_loopback(host_of(host)):
                return 403, ("this server has no token, so it answers only requests addressed "
                             "to a loopback Host (DNS rebinding guard); use http://127.0.0.1 "
                             "or start it with a token")
            origin = headers.get(b"origin")
            if origin is not None and not is_loopback(
                    host_of(origin.decode("latin-1").partition("://")[2])):
                return 403, "cross-origin requests are refused (this server has no token)"
        elif not (method in ("GET", "HEAD") and path in PUBLIC_PATHS):
            got = headers.get(AUTH_HEADER.encode(), b"")
            bearer = BEARER.encode()
            if not (got.startswith(bearer)
                    and hmac.compare_digest(got[len(bearer):], self.token)):
                return 401, "missing or wrong token (Authorization: Bearer TOKEN)"
        if method in ("POST", "PUT", "PATCH"):
            limit = (self.max_chunk_bytes if path.startswith(UPLOADS + "/")
                     and "/chunks/" in path else self.max_request_bytes)
            length = headers.get(b"content-length")
            if length is None:
                if headers.get(b"transfer-encoding"):
                    return 411, "Content-Length is required"
            elif not length.isdigit():
                return 400, "bad Content-Length"
            elif int(length) > limit:
                return 413, f"request body of {int(length)} bytes exceeds the limit of {limit}"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self.problem(scope)
            if err is not None:
                await send_error(send, *err)
                return
        await self.app(scope, receive, send)


def describe_validation(errors: list[dict[str, Any]]) -> str:
    """Pydantic errors as `field: message; ...` without the offending values (which may be
    NaN or huge, and are the client's own anyway)."""
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            msg = f"invalid JSON ({(e.get('ctx') or {}).get('error', '')})"
        parts.append(f"{loc}: {msg}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def install_error_handlers(app) -> None:
    """One-line JSON for validation errors, HTTP errors and crashes (logged with traceback)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        return JSONResponse({"detail": one_line(describe_validation(exc.errors()))}, 422)

    @app.exception_handler(HTTPException)
    async def _http(_request, exc: HTTPException):
        return JSONResponse({"detail": one_line(exc.detail)}, exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        # scope["path"], not request.url: the URL is rebuilt from the Host header, which
        # may be malformed (the crash would then be the handler's own).
        logger.error("%s %s failed", request.method, request.scope["path"], exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the "
                             "server log"}, 500)
