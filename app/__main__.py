"""python -m app [serve] [--host H] [--port P] | migrate | otp enable|disable (--email A | --all) | otp cleanup
| factors bypass --email A --hours H --reason R | factors reseal
| staff create --email A --role admin|viewer | staff list"""

from __future__ import annotations

import argparse
import asyncio
import sys

from app.settings import SettingsError, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="Computer Shop accounts")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve the app (the default)")
    for p in (parser, serve):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--workers", type=int, default=1)
    sub.add_parser("migrate", help="apply migrations to DATABASE_URL")
    otp = sub.add_parser("otp", help="one-time code administration")
    otp_sub = otp.add_subparsers(dest="otp_command", required=True)
    for verb, what in (("enable", "on"), ("disable", "off")):
        cmd = otp_sub.add_parser(verb, help=f"turn sign-in codes {what} for existing customers")
        who = cmd.add_mutually_exclusive_group(required=True)
        who.add_argument("--email")
        who.add_argument("--all", action="store_true")
    otp_sub.add_parser("cleanup", help="delete expired and used codes now")
    factors = sub.add_parser("factors", help="ways to sign in: staff help, key rotation")
    f_sub = factors.add_subparsers(dest="factors_command", required=True)
    bypass = f_sub.add_parser("bypass", help="let a customer who lost every factor in with the emailed code for a while")
    bypass.add_argument("--email", required=True)
    bypass.add_argument("--hours", type=int, default=24)
    bypass.add_argument("--reason", required=True, help="what was checked, for the audit log")
    bypass.add_argument("--staff", default="cli", help="who grants it")
    f_sub.add_parser("reseal", help="re-seal authenticator-app secrets under the current SECRET_KEY")
    staff = sub.add_parser("staff", help="the staff console's accounts")
    s_sub = staff.add_subparsers(dest="staff_command", required=True)
    create = s_sub.add_parser("create", help="add a staff member and print their one-time set-up link (24 h)")
    create.add_argument("--email", required=True)
    create.add_argument("--role", required=True, choices=("admin", "viewer"))
    s_sub.add_parser("list", help="list staff: email, role, last sign-in, state")
    return parser


async def _staff(args: argparse.Namespace) -> int:
    from app.clock import SystemClock
    from app.database import make_database
    from app.staff import Role, accounts

    settings = load_settings()
    db = make_database(settings)
    await db.connect()
    try:
        if args.staff_command == "create":
            try:
                token = await accounts.create(db, email=args.email, role=Role(args.role), now=SystemClock().now())
            except accounts.AlreadyExists:
                print(f"A staff member has the email {args.email} already: nothing changed.", file=sys.stderr)
                return 1
            except ValueError as exc:
                print(f"Nothing changed: {exc}.", file=sys.stderr)
                return 2
            origin = (settings.public_origin or "http://127.0.0.1:8000").rstrip("/")
            print(f"Staff member {args.email} ({args.role}) created. Send them this one-time set-up link "
                  f"(valid {accounts.SETUP_TTL // 3600} h):")
            print(f"{origin}/admin/setup/{token}")
        else:
            members = await accounts.list_staff(db)
            if not members:
                print("No staff yet: python -m app staff create --email ADDRESS --role admin")
            for m in members:
                last = m.last_sign_in_at.isoformat(timespec="minutes") if m.last_sign_in_at else "never"
                state = "disabled" if m.disabled_at else "active"
                print(f"{m.id}\t{m.email}\t{m.role.value}\tlast sign-in {last}\t{state}")
    finally:
        await db.disconnect()
    return 0


async def _factors(args: argparse.Namespace) -> int:
    from app.clock import SystemClock
    from app.database import make_database
    from app.factors import FactorKeys, backup_codes, bypass, totp

    settings = load_settings()
    db = make_database(settings)
    await db.connect()
    try:
        if args.factors_command == "bypass":
            try:
                done = await bypass.grant(db, now=SystemClock().now(), email=args.email, hours=args.hours,
                                          reason=args.reason, staff=args.staff)
            except ValueError as exc:
                print(f"Nothing changed: {exc}.", file=sys.stderr)
                return 2
            if not done:
                print(f"No customer has the email {args.email}: nothing changed.", file=sys.stderr)
                return 1
            print(f"For {args.hours} h, an emailed code completes {args.email}'s second step (audited).")
        else:
            keys = FactorKeys.from_secret(settings.secret_key, settings.secret_key_fallbacks)
            apps, sets = await totp.reseal(db, keys), await backup_codes.reseal(db, keys)
            print(f"Re-sealed {apps} authenticator-app secret(s) and {sets} backup-code set key(s) under the "
                  f"current SECRET_KEY.")
    finally:
        await db.disconnect()
    return 0


async def _otp(args: argparse.Namespace) -> int:
    from app.auth.queries import set_otp
    from app.clock import SystemClock
    from app.database import make_database
    from app.otp.cleanup import cleanup

    settings = load_settings()
    db = make_database(settings)
    await db.connect()
    try:
        if args.otp_command in ("enable", "disable"):
            on = args.otp_command == "enable"
            matched, changed = await set_otp(db, enabled=on, email=None if args.all else args.email)
            if not matched:
                who = "No customer has the email " + args.email if not args.all else "There are no customers"
                print(f"{who}: nothing changed.", file=sys.stderr)
                return 1
            target = "every customer" if args.all else args.email
            print(f"Sign-in codes {'on' if on else 'off'} for {target}: {changed} changed, "
                  f"{matched - changed} already {'on' if on else 'off'}.")
        else:
            # On demand, sent mail a development process kept is looked for too, in any mode.
            deleted = await cleanup(db, now=SystemClock().now(), sent_kept=True)
            print(f"Deleted {deleted} finished code(s); their counts are kept in otp_stats.")
    finally:
        await db.disconnect()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        from app.database import migrate

        migrate(settings.database_url)
        print("database is up to date")
        return 0
    if args.command == "otp":
        return asyncio.run(_otp(args))
    if args.command == "factors":
        return asyncio.run(_factors(args))
    if args.command == "staff":
        return asyncio.run(_staff(args))
    if settings.is_development and settings.is_sqlite:
        from app.database import migrate

        migrate(settings.database_url)  # the embedded database keeps itself up to date
    if settings.is_development:
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print(f"Computer Shop: http://{shown}:{args.port}/  (development inbox, codes included: "
              f"http://{shown}:{args.port}/dev/mail)", flush=True)
    import uvicorn

    uvicorn.run(
        "app.main:app", host=args.host, port=args.port, workers=args.workers,
        proxy_headers=False, server_header=False, log_level="info",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
