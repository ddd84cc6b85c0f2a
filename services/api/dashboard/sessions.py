"""Dashboard sign-in: sessions that stand for an API token without holding it, and CSRF tokens.

The cookie carries a random session id (HttpOnly, SameSite=Lax, Secure over HTTPS); the database
keeps only its SHA-256 and the token's row id (shared/sessions.py). Every form carries the session's CSRF token; the
sign-in form, before any session exists, a double-submit token from its own short-lived cookie.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from dataclasses import dataclass

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from shared.sessions import create_session, delete_session, find_session
from shared.tokens import find_token

SESSION_COOKIE = "healthgate_session"
LOGIN_CSRF_COOKIE = "healthgate_login_csrf"
SESSION_LIFETIME = dt.timedelta(hours=12)


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf_token: str


def is_secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


async def sign_in(pool: asyncpg.Pool, token: str) -> tuple[str, Principal] | None:
    """A new session id for a valid token, or None."""
    row = await find_token(pool, token)
    if row is None:
        return None
    session_id = await create_session(pool, row["id"], SESSION_LIFETIME)
    return session_id, Principal(row["name"], row["role"], tuple(row["groups"]))


async def current_session(pool: asyncpg.Pool, request: Request) -> Session | None:
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        return None
    row = await find_session(pool, session_id)
    if row is None:
        return None
    return Session(Principal(row["name"], row["role"], tuple(row["groups"])), row["csrf_token"])


async def sign_out(pool: asyncpg.Pool, request: Request) -> None:
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        await delete_session(pool, session_id)


def set_session_cookie(response: Response, request: Request, session_id: str) -> None:
    response.set_cookie(
        SESSION_COOKIE, session_id, max_age=int(SESSION_LIFETIME.total_seconds()), path="/",
        httponly=True, samesite="lax", secure=is_secure(request),
    )  # fmt: skip


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")


def new_login_csrf() -> str:
    return secrets.token_urlsafe(24)


def set_login_csrf_cookie(response: Response, request: Request, value: str) -> None:
    response.set_cookie(
        LOGIN_CSRF_COOKIE, value, max_age=3600, path="/login", httponly=True, samesite="strict",
        secure=is_secure(request),
    )  # fmt: skip


def same_token(expected: str | None, given: object) -> bool:
    return bool(expected) and isinstance(given, str) and hmac.compare_digest(expected or "", given)
