"""Form validation: plain functions returning cleaned values and per-field messages."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from email_validator import EmailNotValidError, validate_email

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,29}$")
LINKISH = re.compile(r"(?i)://|www\.|\.(com|net|org|io|ru|cn|xyz|top|info)\b")
PASSWORD_MIN, PASSWORD_MAX = 8, 128
NAME_MAX = 100


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The 30,000 most common passwords that zxcvbn ships."""
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(p.lower() for p in FREQUENCY_LISTS["passwords"])


@dataclass
class Form:
    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def _text(raw: object) -> str:
    return raw if isinstance(raw, str) else ""


def normalize_email(raw: str) -> str | None:
    """Syntax-checked, normalised address (domain lower-cased), or None."""
    try:
        result = validate_email(raw.strip(), check_deliverability=False)
    except EmailNotValidError:
        return None
    return result.normalized.lower()


def check_password(password: str, *, email: str, username: str) -> str | None:
    """A message when the password will not do, else None."""
    if len(password) < PASSWORD_MIN:
        return f"Use at least {PASSWORD_MIN} characters."
    if len(password) > PASSWORD_MAX:
        return f"Use at most {PASSWORD_MAX} characters."
    lowered = password.lower()
    if lowered in common_passwords():
        return "This password is too common; choose one that is harder to guess."
    if lowered in {email.lower(), username.lower(), email.split("@")[0].lower()} - {""}:
        return "Your password must not be your email address or username."
    return None


def registration(data: Mapping[str, object]) -> Form:
    """Validate the registration form."""
    form = Form()
    name = unicodedata.normalize("NFC", _text(data.get("full_name"))).strip()
    username = _text(data.get("username")).strip()
    email_raw = _text(data.get("email")).strip()
    password = _text(data.get("password"))
    confirm = _text(data.get("confirm_password"))
    form.values = {"full_name": name, "username": username, "email": email_raw}

    if not name:
        form.errors["full_name"] = "Enter your full name."
    elif len(name) > NAME_MAX:
        form.errors["full_name"] = f"Use at most {NAME_MAX} characters."
    elif any(unicodedata.category(ch).startswith("C") or unicodedata.category(ch) in ("Zl", "Zp") for ch in name):
        form.errors["full_name"] = "Your name contains characters we cannot use."
    elif LINKISH.search(name):
        # The name is greeted in mail to an address nobody has proved yet: no links in it.
        form.errors["full_name"] = "Enter your name without web addresses."

    if not username:
        form.errors["username"] = "Choose a username."
    elif not USERNAME.match(username):
        form.errors["username"] = "Use 3 to 30 letters, digits, dots, dashes or underscores, starting with a letter or digit."

    email, problem = email_field(email_raw)
    if problem:
        form.errors["email"] = problem
    else:
        form.values["email"] = email

    problem = check_password(password, email=email, username=username)
    if problem:
        form.errors["password"] = problem
    elif confirm != password:
        form.errors["confirm_password"] = "The two passwords do not match."
    return form


EMAIL_MAX = 254  # RFC 5321's limit on a whole address


def email_field(raw: str) -> tuple[str, str | None]:
    """(normalised address, None) or (what was typed, a message saying what to do)."""
    raw = raw.strip()
    if not raw:
        return raw, "Enter your email address."
    if len(raw) > EMAIL_MAX:
        return raw, f"That address is too long: an email address has at most {EMAIL_MAX} characters."
    email = normalize_email(raw)
    if email is None:
        return raw, "Enter an email address like name@example.com."
    return email, None


def new_password(data: Mapping[str, object], *, email: str, username: str, form: Form | None = None,
                 field: str = "new_password", confirm: str = "confirm_new_password") -> Form:
    """A new password and its confirmation, held to the registration's rules."""
    form = form or Form()
    password, again = _text(data.get(field)), _text(data.get(confirm))
    problem = check_password(password, email=email, username=username)
    if problem:
        form.errors[field] = problem
    elif again != password:
        form.errors[confirm] = "The two passwords do not match."
    return form


def forgot(data: Mapping[str, object]) -> Form:
    """The "forgot password" form: one address."""
    form = Form()
    email, problem = email_field(_text(data.get("email")))
    form.values["email"] = email
    if problem:
        form.errors["email"] = problem
    return form


def change_password(data: Mapping[str, object], *, email: str, username: str) -> Form:
    form = Form()
    if not _text(data.get("current_password")):
        form.errors["current_password"] = "Enter your current password."
    new_password(data, email=email, username=username, form=form)
    if not form.errors and _text(data.get("current_password")) == _text(data.get("new_password")):
        form.errors["new_password"] = "Choose a password different from the current one."
    return form


def change_email(data: Mapping[str, object], *, current: str) -> Form:
    form = Form()
    email, problem = email_field(_text(data.get("new_email")))
    form.values["new_email"] = email
    if problem:
        form.errors["new_email"] = problem.replace("Enter your email address.", "Enter the new email address.")
    elif email == current.lower():
        form.errors["new_email"] = "That is already your email address."
    if not _text(data.get("password")):
        form.errors["password"] = "Enter your password to confirm the change."
    return form


def password_only(data: Mapping[str, object]) -> Form:
    form = Form()
    if not _text(data.get("password")):
        form.errors["password"] = "Enter your password to confirm."
    return form


def login(data: Mapping[str, object]) -> Form:
    """Validate the sign-in form (only presence and size: the password check says the rest)."""
    form = Form()
    who = _text(data.get("login")).strip()
    password = _text(data.get("password"))
    form.values = {"login": who}
    if not who:
        form.errors["login"] = "Enter your username or email address."
    elif len(who) > 254:
        form.errors["login"] = "That is longer than any username or email address."
    if not password:
        form.errors["password"] = "Enter your password."
    elif len(password) > PASSWORD_MAX * 4:
        form.errors["password"] = "That password is too long."
    return form


def code(data: Mapping[str, object]) -> tuple[str | None, str | None]:
    """(six digits, None) or (None, message). Spaces and dashes from a paste are fine."""
    raw = re.sub(r"[\s\-\u2010-\u2015]", "", _text(data.get("code")))
    raw = unicodedata.normalize("NFKC", raw)
    if not raw:
        return None, "Enter the 6-digit code from the email."
    if not raw.isascii() or not raw.isdigit() or len(raw) != 6:
        return None, "The code is 6 digits, like 123456."
    return raw, None


def mask_email(email: str) -> str:
    """j***@example.com"""
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}" if local else f"***@{domain}"
