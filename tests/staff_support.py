"""Staff members and console sessions for tests: made directly in the database (the sign-in
itself is tested in test_staff_auth.py), so any test can act as an admin or a viewer."""

from __future__ import annotations

from typing import Any

import httpx
import pyotp
import sqlalchemy as sa

from app import sql
from app.factors import totp
from app.security.crypto import token
from app.security.passwords import hash_password
from app.staff import Role, Staff, sessions
from app.staff.web import AdminCookie, cookie_value, name_for
from app.tables import staff as staff_table
from tests.conftest import PASSWORD, Running, csrf_from

_INSERT = sql.Query(staff_table.insert(), columns=("email", "role", "password_hash", "totp_secret", "created_at"))
_PASSWORD_HASHES: dict[str, str] = {}


async def make_staff(server: Running, *, role: Role = Role.ADMIN, email: str = "admin@shop.example",
                     password: str = PASSWORD) -> tuple[Staff, str]:
    """A set-up staff member (password and authenticator app); (the row, the app's secret)."""
    svc = server.services
    if password not in _PASSWORD_HASHES:  # Argon2 once per password per test run
        _PASSWORD_HASHES[password] = await hash_password(password)
    secret = totp.new_secret()
    now = svc.clock.now()
    new_id = await sql.insert(svc.db, _INSERT, email=email, role=Role(role).value,
                              password_hash=_PASSWORD_HASHES[password],
                              totp_secret=svc.factors.at_rest.seal({"s": secret}), created_at=now)
    return Staff(new_id, email, Role(role)), secret


def cookies_for(server: Running, session_token: str | None, csrf: str | None = None) -> dict[str, str]:
    """The admin cookie, as `server.client(cookies=...)` takes it."""
    settings = server.services.settings
    cookie = AdminCookie(token=session_token, csrf=csrf or token())
    return {name_for(settings): cookie_value(settings, cookie)}


async def staff_cookies(server: Running, *, role: Role = Role.ADMIN,
                        email: str = "admin@shop.example") -> tuple[dict[str, str], Staff]:
    """A staff member with a live console session: (cookies for `server.client`, the staff member)."""
    member, _ = await make_staff(server, role=role, email=email)
    svc = server.services
    session_token = await sessions.create(svc.db, staff_id=member.id, ip="127.0.0.1", user_agent="tests",
                                          now=svc.clock.now())
    return cookies_for(server, session_token), member


async def staff_form(client: httpx.AsyncClient, path: str = "/admin") -> dict[str, str]:
    """{"csrf_token": ...} read from a console page, for a POST."""
    r = await client.get(path)
    assert r.status_code == 200, (path, r.status_code)
    return {"csrf_token": csrf_from(r.text)}


def code_now(server: Running, secret: str, *, offset_steps: int = 0) -> str:
    """The app's current code (or the one `offset_steps` away) on the server's clock."""
    at = server.services.clock.now().timestamp() + offset_steps * totp.STEP
    return str(pyotp.TOTP(secret, digits=totp.DIGITS, interval=totp.STEP).at(at))


async def staff_row(server: Running, staff_id: int) -> Any:
    return await sql.fetch_one(server.services.db, sql.Query(
        sa.select(staff_table).where(staff_table.c.id == sa.bindparam("sid"))), sid=staff_id)
