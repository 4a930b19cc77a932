"""The dashboard's session: a flag in Starlette's signed session cookie (itsdangerous),
set at sign-in with an admin API key."""

from __future__ import annotations

from fastapi import Request

SESSION_KEY = "dmc_admin"
COOKIE_NAME = "dmc_session"


def signed_in(request: Request) -> bool:
    return bool(request.session.get(SESSION_KEY))
