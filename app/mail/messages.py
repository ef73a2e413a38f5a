"""Build the customer mails (multipart text + HTML) from templates/emails/."""

from __future__ import annotations

import re
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "templates" / "emails"

SUBJECTS = {
    "registration_code": "Your Computer Shop verification code",
    "login_code": "Your Computer Shop sign-in code",
    "account_exists": "You already have a Computer Shop account",
    "username_taken": "Your Computer Shop registration",
}

_html = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined)
_text = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False, undefined=jinja2.StrictUndefined)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean(value: str) -> str:
    """User text for a mail: control characters (CR/LF included) become spaces."""
    return _CONTROL.sub(" ", value).strip()


def render(kind: str, context: dict[str, Any]) -> tuple[str, str, str]:
    """(subject, text, html) for a message kind."""
    ctx = {k: clean(v) if isinstance(v, str) else v for k, v in context.items()}
    text = _text.get_template(f"{kind}.txt").render(ctx)
    html = _html.get_template(f"{kind}.html").render(ctx)
    return SUBJECTS[kind], text, html


def build(kind: str, context: dict[str, Any], *, recipient: str, sender: str, domain: str = "localhost") -> EmailMessage:
    """A ready-to-send multipart message. Header values never carry user text but the address."""
    subject, text, html = render(kind, context)
    if _CONTROL.search(recipient):
        raise ValueError("recipient contains control characters")
    msg = EmailMessage()
    name, addr = parseaddr(sender)
    msg["From"] = Address(display_name=name, addr_spec=addr) if name else addr
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=addr.rpartition("@")[2] or domain)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg
