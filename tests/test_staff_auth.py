"""The staff console's accounts and way in, on both backends (issue 18, SECURITY.md 38): the
CLI's set-up link, set-up, sign-in with password and authenticator app, lockout, replay, the
console's own cookie and timeouts, disabling, and a walk of every /admin route as a visitor,
a customer, a viewer and an admin."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.routing import Mount, Route

from app import sql
from app.__main__ import main as cli
from app.clock import FixedClock
from app.staff import ABSOLUTE_TIMEOUT, IDLE_TIMEOUT, Role, accounts, auth_routes
from app.tables import auth_events, staff_sessions
from app.tables import staff as staff_table
from tests.conftest import (
    PASSWORD,
    PUBLIC_ORIGIN,
    Capture,
    Running,
    csrf_from,
    production,
    registered,
    running,
    with_,
)
from tests.staff_support import code_now, cookies_for, make_staff, staff_cookies, staff_form, staff_row

pytestmark = pytest.mark.anyio

EMAIL = "admin@shop.example"
NEW_PASSWORD = "Quiet-Copper-Falcon-77"
PUBLIC_PATHS = ("/admin/login", "/admin/login/code", "/admin/setup/{token}")
SECRET_SHOWN = re.compile(r'class="secret"[^>]*>([A-Z2-7 ]+)<')


def mounted(server: Running) -> Running:
    """The server with the console's sign-in routes. app/main.py mounts them; until it does,
    they are added here, before the static files (a no-op once main.py has them)."""
    if not any(getattr(r, "path", None) == "/admin/login" for r in server.app.routes):
        server.app.router.routes[-1:-1] = auth_routes.routes
    return server


@pytest.fixture
def console(server: Running) -> Running:
    return mounted(server)


def now_of(server: Running) -> Any:
    return server.services.clock.now()


async def events(server: Running, name: str) -> list[Any]:
    return await server.services.db.fetch_all(
        sa.select(auth_events.c.staff_id, auth_events.c.detail).where(auth_events.c.event == name)
        .order_by(auth_events.c.id))


async def sign_in(c: httpx.AsyncClient, *, email: str = EMAIL, password: str = PASSWORD,
                  code: str | None = None) -> httpx.Response:
    """The password step, then (given a code) the code step; the last response."""
    page = await c.get("/admin/login")
    assert page.status_code == 200, page.status_code
    r = await c.post("/admin/login", data={"csrf_token": csrf_from(page.text), "email": email, "password": password})
    if code is None or r.status_code != 303:
        return r
    assert r.headers["location"] == "/admin/login/code"
    page = await c.get("/admin/login/code")
    return await c.post("/admin/login/code", data={"csrf_token": csrf_from(page.text), "code": code})


async def enter_code(c: httpx.AsyncClient, code: str) -> httpx.Response:
    page = await c.get("/admin/login/code")
    assert page.status_code == 200, page.status_code
    return await c.post("/admin/login/code", data={"csrf_token": csrf_from(page.text), "code": code})


# --- the CLI and set-up --------------------------------------------------------------------------


def test_cli_create_prints_a_set_up_link_and_list_shows_the_new_staff_member(
        settings: Any, db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the working tree
    for name, value in {"APP_ENV": "test", "DATABASE_URL": db_url, "SECRET_KEY": settings.secret_key}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PUBLIC_ORIGIN", raising=False)
    assert cli(["staff", "create", "--email", "Ann@Shop.Example", "--role", "viewer"]) == 0
    link = re.search(r"http://127\.0\.0\.1:8000/admin/setup/(\S+)", capsys.readouterr().out)
    assert link, "no set-up link printed"

    assert cli(["staff", "create", "--email", "ann@shop.example", "--role", "admin"]) == 1  # taken
    assert "already" in capsys.readouterr().err
    assert cli(["staff", "create", "--email", "not an address", "--role", "admin"]) == 2

    monkeypatch.setenv("PUBLIC_ORIGIN", "https://shop.example")
    assert cli(["staff", "create", "--email", "bob@shop.example", "--role", "admin"]) == 0
    assert "https://shop.example/admin/setup/" in capsys.readouterr().out
    assert cli(["staff", "list"]) == 0
    listed = capsys.readouterr().out
    assert "ann@shop.example\tviewer\tlast sign-in never\tactive" in listed
    assert "bob@shop.example\tadmin" in listed

    async def the_link_opens_set_up() -> None:
        async with running(settings, FixedClock()) as server:
            mounted(server)
            async with server.client() as c:
                page = await c.get(f"/admin/setup/{link.group(1)}")
                assert page.status_code == 200 and "ann@shop.example" in page.text

    asyncio.run(the_link_opens_set_up())


async def test_set_up_link_sets_password_and_app_once_then_sign_in_needs_both(
        console: Running, clock: FixedClock) -> None:
    token = await accounts.create(console.services.db, email=EMAIL, role=Role.ADMIN, now=now_of(console))
    async with console.client() as c:
        page = await c.get(f"/admin/setup/{token}")
        assert page.status_code == 200
        for words in ("Password", "Confirm password", "Setup key", "Code from your authenticator app",
                      "Finish set-up", "<svg"):
            assert words in page.text, words
        secret = SECRET_SHOWN.search(page.text).group(1).replace(" ", "")  # type: ignore[union-attr]
        again = await c.get(f"/admin/setup/{token}")
        assert SECRET_SHOWN.search(again.text).group(1).replace(" ", "") == secret  # type: ignore[union-attr]

        r = await c.post(f"/admin/setup/{token}", data={
            "csrf_token": csrf_from(again.text), "password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD,
            "code": code_now(console, secret)})
        assert r.status_code == 303 and r.headers["location"] == "/admin/login?set_up=1", r.text

        # Single use: the link is gone, for a look and for a second submission.
        assert (await c.get(f"/admin/setup/{token}")).status_code == 404
        r = await c.post(f"/admin/setup/{token}", data={
            "csrf_token": csrf_from(again.text), "password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD,
            "code": code_now(console, secret)})
        assert r.status_code == 404

    clock.advance(30)  # the set-up code's step is used
    async with console.client() as c:
        r = await sign_in(c, password=NEW_PASSWORD)
        assert r.status_code == 303 and r.headers["location"] == "/admin/login/code"
        # The password alone reaches no console page.
        home = await c.get("/admin")
        assert home.status_code == 303 and home.headers["location"] == "/admin/login"
        r = await enter_code(c, code_now(console, secret))
        assert r.status_code == 303 and r.headers["location"] == "/admin"
        home = await c.get("/admin")
        assert home.status_code == 200 and EMAIL in home.text and "/admin/staff" in home.text
    assert len(await events(console, "staff_signed_in")) == 1
    created = [json.loads(e.detail) for e in await events(console, "staff_created")]
    assert created[0]["after"] == {"email": EMAIL, "role": "admin"} and created[0]["by"] == "cli"
    assert created[1]["set_up"] is True and len(created) == 2


async def test_set_up_link_expires_after_24_hours(console: Running, clock: FixedClock) -> None:
    token = await accounts.create(console.services.db, email=EMAIL, role=Role.VIEWER, now=now_of(console))
    clock.advance(accounts.SETUP_TTL - 60)
    async with console.client() as c:
        assert (await c.get(f"/admin/setup/{token}")).status_code == 200
        clock.advance(61)
        page = await c.get(f"/admin/setup/{token}")
        assert page.status_code == 404 and "does not work" in page.text
        assert (await c.get("/admin/setup/not-a-token")).status_code == 404
        assert (await c.get("/admin/setup/" + "x" * 5000)).status_code == 404


async def test_set_up_refuses_a_weak_password_a_mismatch_and_a_wrong_code_with_422(console: Running) -> None:
    token = await accounts.create(console.services.db, email=EMAIL, role=Role.ADMIN, now=now_of(console))
    async with console.client() as c:
        page = await c.get(f"/admin/setup/{token}")
        secret = SECRET_SHOWN.search(page.text).group(1).replace(" ", "")  # type: ignore[union-attr]
        form = {"csrf_token": csrf_from(page.text), "password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD,
                "code": code_now(console, secret)}
        for change, message in (({"password": "password", "confirm_password": "password"}, "too common"),
                                ({"confirm_password": "Something-Else-99"}, "do not match"),
                                ({"code": "000000" if code_now(console, secret) != "000000" else "111111"},
                                 "not right"),
                                ({"code": ""}, "Enter the 6-digit code"),
                                ({"password": "", "confirm_password": ""}, "at least 8")):
            r = await c.post(f"/admin/setup/{token}", data={**form, **change})
            assert r.status_code == 422 and message in r.text, (change, r.status_code)
        r = await c.post(f"/admin/setup/{token}", data={"csrf_token": form["csrf_token"]})  # every field missing
        assert r.status_code == 422
        r = await c.post(f"/admin/setup/{token}", data=form)
        assert r.status_code == 303


# --- sign-in -----------------------------------------------------------------------------------


async def test_unknown_email_wrong_password_disabled_and_not_set_up_answer_alike(console: Running) -> None:
    await make_staff(console)
    gone, _ = await make_staff(console, email="gone@shop.example")
    await accounts.disable(console.services.db, staff_id=gone.id, by=(await make_staff(
        console, email="boss@shop.example"))[0], now=now_of(console), client=accounts.CLI)
    await accounts.create(console.services.db, email="new@shop.example", role=Role.ADMIN, now=now_of(console))
    answers = set()
    async with console.client() as c:
        for email, password in ((EMAIL, "Wrong-Password-123"), ("nobody@shop.example", PASSWORD),
                                ("gone@shop.example", PASSWORD), ("new@shop.example", PASSWORD)):
            r = await sign_in(c, email=email, password=password)
            assert r.status_code == 422, (email, r.status_code)
            answers.add(re.sub(r'value="[^"]*"', "", r.text).replace(email, "EMAIL"))
            assert (await c.get("/admin/login/code")).status_code == 303
        r = await c.post("/admin/login", data={"csrf_token": csrf_from((await c.get("/admin/login")).text)})
        assert r.status_code == 422 and "Enter your email address." in r.text and "Enter your password." in r.text
    assert len(answers) == 1
    assert len(await events(console, "staff_failed")) == 3  # the three that exist


async def test_the_addresss_own_limit_answers_like_a_wrong_password(settings: Any, clock: FixedClock) -> None:
    async with running(with_(settings, login_account_rate_limit="3/15minutes"), clock) as server:
        mounted(server)
        _, secret = await make_staff(server)
        async with server.client() as c:
            wrong = [await sign_in(c, password="Wrong-Password-123") for _ in range(3)]
            limited = await sign_in(c)
            assert limited.status_code == 422 and limited.text == wrong[0].text.replace(
                csrf_from(wrong[0].text), csrf_from(limited.text))
            clock.advance(15 * 60 + 1)
            assert (await sign_in(c, code=code_now(server, secret))).headers["location"] == "/admin"


async def test_wrong_codes_are_counted_and_the_fifth_locks_for_15_minutes(console: Running, clock: FixedClock) -> None:
    member, secret = await make_staff(console)
    right = code_now(console, secret)
    wrong = "123456" if right != "123456" else "654321"
    async with console.client() as c:
        assert (await sign_in(c)).status_code == 303
        for left in (4, 3, 2, 1):
            r = await enter_code(c, wrong)
            assert r.status_code == 422 and f"({left} tr" in r.text
        r = await enter_code(c, wrong)
        assert r.status_code == 422 and "locked for 15 minutes" in r.text
        # Locked: the right password answers like a wrong one, so the right code is never asked.
        assert (await sign_in(c)).status_code == 422
        # Fresh cookies count with the same row (the count lives in the database).
    async with console.client() as c:
        assert (await sign_in(c)).status_code == 422
        clock.advance(accounts.LOCKOUT + 1)
        r = await sign_in(c, code=code_now(console, secret))
        assert r.status_code == 303 and r.headers["location"] == "/admin"
    row = await staff_row(console, member.id)
    assert row.failures == 0 and row.last_sign_in_at is not None


async def test_concurrent_wrong_codes_compare_at_most_five(console: Running) -> None:
    member, secret = await make_staff(console)
    db, keys = console.services.db, console.services.factors
    wrong = "123456" if code_now(console, secret) != "123456" else "654321"
    results = await asyncio.gather(*(accounts.check_code(db, keys, staff_id=member.id, code=wrong, now=now_of(console),
                                                         client=accounts.CLI) for _ in range(20)))
    assert sum(r.verdict is accounts.CodeVerdict.WRONG for r in results) <= 4
    assert all(r.verdict is not accounts.CodeVerdict.OK for r in results)
    right = await accounts.check_code(db, keys, staff_id=member.id, code=code_now(console, secret), now=now_of(console),
                                      client=accounts.CLI)
    assert right.verdict is accounts.CodeVerdict.LOCKED


async def test_an_attempt_past_the_budget_is_never_compared_even_before_the_lock_is_written(
        console: Running) -> None:
    # Five attempts counted by requests still in flight (their lock not written yet): a sixth,
    # even with the right code, is refused without being compared.
    member, secret = await make_staff(console)
    db = console.services.db
    await sql.execute(db, sql.Query(staff_table.update().where(staff_table.c.id == sa.bindparam("sid"))
                                    .values(failures=accounts.MAX_FAILURES)), sid=member.id)
    result = await accounts.check_code(db, console.services.factors, staff_id=member.id,
                                       code=code_now(console, secret), now=now_of(console), client=accounts.CLI)
    assert result.verdict is accounts.CodeVerdict.LOCKED
    row = await staff_row(console, member.id)
    assert row.locked_until is not None and row.last_sign_in_at is None


async def test_a_code_is_accepted_once(console: Running, clock: FixedClock) -> None:
    _, secret = await make_staff(console)
    code = code_now(console, secret)
    async with console.client() as c:
        assert (await sign_in(c, code=code)).status_code == 303
    clock.advance(5)
    async with console.client() as c:
        r = await sign_in(c, code=code)
        assert r.status_code == 422 and "not right" in r.text
        # An earlier step (within the drift) is no better.
        r = await enter_code(c, code_now(console, secret, offset_steps=-1))
        assert r.status_code == 422
        clock.advance(30)
        r = await enter_code(c, code_now(console, secret))
        assert r.status_code == 303


async def test_the_code_step_expires_and_needs_the_password_step(console: Running, clock: FixedClock) -> None:
    _, secret = await make_staff(console)
    async with console.client() as c:
        assert (await c.get("/admin/login/code")).headers["location"] == "/admin/login"
        assert (await sign_in(c)).status_code == 303
        page = await c.get("/admin/login/code")
        clock.advance(301)
        r = await c.post("/admin/login/code", data={"csrf_token": csrf_from(page.text),
                                                    "code": code_now(console, secret)})
        assert r.status_code == 303 and r.headers["location"] == "/admin/login?expired=1"
        assert (await c.get("/admin")).status_code == 303


async def test_every_sign_in_starts_a_new_cookie_session(console: Running) -> None:
    _, secret = await make_staff(console)
    async with console.client() as c:
        before = csrf_from((await c.get("/admin/login")).text)
        await sign_in(c)
        pending = csrf_from((await c.get("/admin/login/code")).text)
        assert (await enter_code(c, code_now(console, secret))).status_code == 303
        after = csrf_from((await c.get("/admin")).text)
    assert len({before, pending, after}) == 3


async def test_htmx_sign_in_answers_with_hx_headers_not_redirects(console: Running) -> None:
    _, secret = await make_staff(console)
    hx = {"HX-Request": "true"}
    async with console.client() as c:
        page = await c.get("/admin/login")
        r = await c.post("/admin/login", headers=hx,
                         data={"csrf_token": csrf_from(page.text), "email": EMAIL, "password": PASSWORD})
        assert r.status_code == 200 and json.loads(r.headers["HX-Location"])["path"] == "/admin/login/code"
        frag = await c.get("/admin/login/code", headers=hx)
        assert frag.status_code == 200 and "<html" not in frag.text and "Verify" in frag.text
        r = await c.post("/admin/login/code", headers=hx,
                         data={"csrf_token": csrf_from(frag.text), "code": code_now(console, secret)})
        assert r.status_code == 200 and r.headers["HX-Redirect"] == "/admin"
        assert (await c.get("/admin", headers=hx)).status_code == 200


async def test_sign_out_ends_the_session_for_the_old_cookie_too(console: Running) -> None:
    member, secret = await make_staff(console)
    async with console.client() as c:
        await sign_in(c, code=code_now(console, secret))
        old = dict(c.cookies.items())
        form = await staff_form(c)
        r = await c.post("/admin/logout", data=form)
        assert r.status_code == 303 and r.headers["location"] == "/admin/login?signed_out=1"
        assert (await c.get("/admin")).status_code == 303
    async with console.client(cookies=old) as c:
        assert (await c.get("/admin")).status_code == 303
    assert [e.staff_id for e in await events(console, "staff_signed_out")] == [member.id]


# --- the cookie and the timeouts -----------------------------------------------------------------


def admin_set_cookie(r: httpx.Response) -> str:
    found = [h for h in r.headers.get_list("set-cookie") if "admin_session=" in h]
    assert len(found) == 1, r.headers.get_list("set-cookie")
    return found[0]


async def test_admin_cookie_is_path_admin_httponly_strict_and_ends_with_the_browser(console: Running) -> None:
    _, secret = await make_staff(console)
    async with console.client() as c:
        page = await c.get("/admin/login")
        header = admin_set_cookie(page).lower()
        # The customer's cookie is not started by a console page.
        assert not any(h.startswith(console.services.settings.session_cookie + "=")
                       for h in page.headers.get_list("set-cookie"))
        await sign_in(c)
        r = await enter_code(c, code_now(console, secret))
        for h in (header, admin_set_cookie(r).lower()):
            assert h.startswith("admin_session=")
            assert "path=/admin;" in h + ";" and "httponly" in h and "samesite=strict" in h
            assert "max-age" not in h and "expires" not in h and "domain" not in h and "secure" not in h


async def test_production_cookie_is_secure_with_the_secure_prefix(settings: Any, clock: FixedClock) -> None:
    async with running(production(settings), clock) as server:
        mounted(server)
        _, secret = await make_staff(server)
        async with server.client(base_url=PUBLIC_ORIGIN) as c:
            page = await c.get("/admin/login")
            header = admin_set_cookie(page)
            assert header.startswith("__Secure-admin_session=") and "secure" in header.lower()
            assert "path=/admin" in header.lower() and "samesite=strict" in header.lower()
            r = await sign_in(c, code=code_now(server, secret))
            assert r.status_code == 303 and r.headers["location"] == "/admin"
            assert (await c.get("/admin")).status_code == 200


async def test_a_forged_or_foreign_cookie_grants_nothing(console: Running) -> None:
    cookies, member = await staff_cookies(console)
    name, value = next(iter(cookies.items()))
    async with console.client(cookies={name: value[:-2] + ("AA" if not value.endswith("AA") else "BB")}) as c:
        assert (await c.get("/admin")).status_code == 303
    async with console.client(cookies={"session": value}) as c:  # the admin value in the customer's cookie
        assert (await c.get("/admin")).status_code == 303


async def test_idle_timeout_is_15_minutes(console: Running, clock: FixedClock) -> None:
    cookies, _ = await staff_cookies(console)
    async with console.client(cookies=cookies) as c:
        for _ in range(4):
            clock.advance(IDLE_TIMEOUT - 60)
            assert (await c.get("/admin")).status_code == 200
        clock.advance(IDLE_TIMEOUT)
        r = await c.get("/admin")
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"


async def test_absolute_timeout_is_8_hours_however_busy(console: Running, clock: FixedClock) -> None:
    cookies, _ = await staff_cookies(console)
    async with console.client(cookies=cookies) as c:
        for _ in range(ABSOLUTE_TIMEOUT // 600 - 1):
            clock.advance(600)
            assert (await c.get("/admin")).status_code == 200
        clock.advance(600)
        assert (await c.get("/admin")).status_code == 303


async def test_last_seen_is_written_at_most_once_a_minute(console: Running, clock: FixedClock) -> None:
    cookies, _ = await staff_cookies(console)
    q = sql.Query(sa.select(staff_sessions.c.last_seen_at))
    first = await sql.fetch_val(console.services.db, q)
    async with console.client(cookies=cookies) as c:
        clock.advance(30)
        await c.get("/admin")
        assert await sql.fetch_val(console.services.db, q) == first
        clock.advance(31)
        await c.get("/admin")
        assert await sql.fetch_val(console.services.db, q) == now_of(console)


async def test_a_customer_session_grants_nothing_in_the_console(console: Running, smtp: Capture) -> None:
    async with console.client() as c:
        await registered(c, smtp)
        assert (await c.get("/dashboard")).status_code == 200
        r = await c.get("/admin")
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"


# --- staff list and disabling --------------------------------------------------------------------


async def test_disabling_a_staff_member_ends_their_sessions_and_is_audited(console: Running) -> None:
    admin_cookies, admin = await staff_cookies(console)
    viewer_cookies, viewer = await staff_cookies(console, role=Role.VIEWER, email="viewer@shop.example")
    async with console.client(cookies=viewer_cookies) as v:
        assert (await v.get("/admin")).status_code == 200
        async with console.client(cookies=admin_cookies) as a:
            page = await a.get("/admin/staff")
            assert page.status_code == 200 and "viewer@shop.example" in page.text and "Disable" in page.text
            r = await a.post(f"/admin/staff/{viewer.id}/disable", data={"csrf_token": csrf_from(page.text)})
            assert r.status_code == 303 and r.headers["location"] == "/admin/staff?disabled=1"
            listed = await a.get("/admin/staff?disabled=1")
            assert "disabled" in listed.text and "sessions have ended" in listed.text
            again = await a.post(f"/admin/staff/{viewer.id}/disable", data={"csrf_token": csrf_from(page.text)})
            assert again.status_code == 200 and "already disabled" in again.text
        assert (await v.get("/admin")).status_code == 303
    revoked = await console.services.db.fetch_val(
        sa.select(sa.func.count()).select_from(staff_sessions)
        .where(staff_sessions.c.staff_id == viewer.id, staff_sessions.c.revoked_at.is_not(None)))
    assert revoked == 1
    [event] = await events(console, "staff_disabled")
    detail = json.loads(event.detail)
    assert event.staff_id == admin.id and detail["staff"] == viewer.id
    assert detail["before"] == {"disabled_at": None} and detail["after"]["disabled_at"]


async def test_a_staff_member_disabled_in_the_database_loses_every_session_at_once(console: Running) -> None:
    cookies, member = await staff_cookies(console)
    await sql.execute(console.services.db, sql.Query(
        staff_table.update().where(staff_table.c.id == sa.bindparam("sid")).values(disabled_at=sa.bindparam("now"))),
        sid=member.id, now=now_of(console))
    async with console.client(cookies=cookies) as c:
        assert (await c.get("/admin")).status_code == 303


async def test_an_admin_cannot_disable_themselves(console: Running) -> None:
    cookies, admin = await staff_cookies(console)
    async with console.client(cookies=cookies) as c:
        form = await staff_form(c, "/admin/staff")
        r = await c.post(f"/admin/staff/{admin.id}/disable", data=form)
        assert r.status_code == 422 and "your own account" in r.text
        assert (await c.get("/admin")).status_code == 200
    assert (await staff_row(console, admin.id)).disabled_at is None


@pytest.mark.parametrize("bad", ["abc", "0", "-1", "99999999999999999999", "2147483648", "１", "1.5", "999999"])
async def test_bad_staff_ids_are_422_never_500(console: Running, bad: str) -> None:
    cookies, _ = await staff_cookies(console)
    async with console.client(cookies=cookies) as c:
        form = await staff_form(c, "/admin/staff")
        r = await c.post(f"/admin/staff/{bad}/disable", data=form)
        assert r.status_code == 422 and "no such staff member" in r.text


# --- the walk: every console route, as everyone ----------------------------------------------------


def console_routes(app: Any) -> Iterator[tuple[str, str, Any]]:
    """(path, method, endpoint) of every route under /admin, mounts included."""

    def walk(routes: list[Any], prefix: str) -> Iterator[tuple[str, str, Any]]:
        for route in routes:
            if isinstance(route, Mount):
                yield from walk(route.routes, prefix + route.path)
            elif isinstance(route, Route):
                path = prefix + route.path
                if path == "/admin" or path.startswith("/admin/"):
                    for method in sorted((route.methods or set()) - {"HEAD"}):
                        yield path, method, route.endpoint

    return walk(app.routes, "")


def filled(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def public(path: str) -> bool:
    return path in PUBLIC_PATHS


async def test_every_console_route_names_its_role_and_guards_its_posts(console: Running) -> None:
    found = list(console_routes(console.app))
    assert {p for p, _, _ in found} >= {"/admin", "/admin/login", "/admin/staff", "/admin/staff/{id}/disable"}
    for path, method, endpoint in found:
        if not public(path):
            assert getattr(endpoint, "staff_role", None) in (Role.VIEWER, Role.ADMIN), (method, path)
        if method != "GET":
            assert getattr(endpoint, "csrf_protected", False), (method, path)


async def test_role_walk_visitor_and_customer_are_refused_everywhere(console: Running, smtp: Capture) -> None:
    routes = list(console_routes(console.app))
    async with console.client() as visitor, console.client() as customer:
        await registered(customer, smtp)
        customer_csrf = csrf_from((await customer.get("/dashboard")).text)
        for who, c in (("visitor", visitor), ("customer", customer)):
            for path, method, _ in routes:
                url = filled(path)
                if method == "GET":
                    r = await c.get(url)
                    if public(path):
                        assert r.status_code in (200, 303, 404), (who, url, r.status_code)
                    else:
                        assert r.status_code == 303 and r.headers["location"] == "/admin/login", (who, url, r.status_code)
                else:
                    data = {"csrf_token": customer_csrf} if who == "customer" else {}
                    headers = {"X-CSRF-Token": customer_csrf} if who == "customer" else {}
                    r = await c.request(method, url, data=data, headers=headers)
                    assert r.status_code in (403, 303), (who, method, url, r.status_code)
                    if r.status_code == 303:
                        assert r.headers["location"].startswith("/admin/login"), (who, method, url)
        assert (await customer.get("/dashboard")).status_code == 200  # still a signed-in customer


async def test_role_walk_viewer_is_refused_every_admin_route(console: Running) -> None:
    cookies, _ = await staff_cookies(console, role=Role.VIEWER, email="viewer@shop.example")
    routes = list(console_routes(console.app))
    async with console.client(cookies=cookies) as c:
        form = await staff_form(c)
        for path, method, endpoint in routes:
            url, role = filled(path), getattr(endpoint, "staff_role", None)
            if path == "/admin/logout":
                continue
            if method == "GET":
                r = await c.get(url)
            else:
                r = await c.request(method, url, data=form, headers={"X-CSRF-Token": form["csrf_token"]})
            assert r.status_code < 500, (method, url, r.status_code)
            if role is Role.ADMIN:
                assert r.status_code == 403, (method, url, r.status_code)
            elif role is Role.VIEWER:
                assert r.status_code != 403, (method, url, r.status_code)
        assert (await c.get("/admin")).status_code == 200  # still signed in: nothing above ended it


async def test_role_walk_admin_passes_every_route_and_every_post_needs_the_csrf_token(console: Running) -> None:
    cookies, admin = await staff_cookies(console)
    routes = list(console_routes(console.app))
    async with console.client(cookies=cookies) as c:
        form = await staff_form(c)
        for path, method, _ in routes:
            url = filled(path)
            if method == "GET":
                continue
            for refused in ({"data": {}}, {"data": {"csrf_token": "forged"}},
                            {"data": form, "headers": {"Origin": "https://evil.example"}},
                            {"data": form, "headers": {"Sec-Fetch-Site": "cross-site"}}):
                r = await c.request(method, url, **refused)
                assert r.status_code == 403, (method, url, refused, r.status_code)
        for path, method, _ in routes:
            url = filled(path)
            if path == "/admin/logout":
                continue
            if method == "GET":
                r = await c.get(url)
            else:
                r = await c.request(method, url, data=form)
            assert r.status_code != 403 and r.status_code < 500, (method, url, r.status_code)
        assert (await c.get("/admin")).status_code == 200
        r = await c.post("/admin/logout", data=form)
        assert r.status_code == 303
    assert (await staff_row(console, admin.id)).disabled_at is None


async def test_sign_out_of_an_ended_session_is_simply_signed_out(console: Running, clock: FixedClock) -> None:
    _, member = await staff_cookies(console)
    async with console.client(cookies=cookies_for(console, "no-such-session")) as c:
        page = await c.get("/admin/login")
        r = await c.post("/admin/logout", data={"csrf_token": csrf_from(page.text)})
        assert r.status_code == 303 and r.headers["location"] == "/admin/login?signed_out=1"
    assert member.role is Role.ADMIN
