"""Build the customer mails (multipart text + HTML) from templates/emails/."""

from __future__ import annotations

import binascii
import re
import secrets
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any, cast

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "templates" / "emails"

SUBJECTS = {
    "registration_code": "Your Computer Shop verification code",
    "login_code": "Your Computer Shop sign-in code",
    "reset_code": "Your Computer Shop password reset code",
    "email_code": "Confirm your new Computer Shop email address",
    "delete_code": "Your Computer Shop account deletion code",
    "account_exists": "You already have a Computer Shop account",
    "username_taken": "Your Computer Shop registration",  # no longer sent; kept for mail queued before
    "password_changed": "Your Computer Shop password was changed",
    "email_changed": "Your Computer Shop email address was changed",
    "address_in_use": "Someone tried to use your email address",
    "account_deleted": "Your Computer Shop account was deleted",
    "factor_added": "A new way to sign in was added to your Computer Shop account",
    "factor_removed": "A way to sign in was removed from your Computer Shop account",
    "backup_codes_created": "New Computer Shop backup codes were made",
    "backup_code_used": "A Computer Shop backup code was used",
    "confirm_reminder": "Confirm your Computer Shop email address",
}

html_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined)
text_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False, undefined=jinja2.StrictUndefined)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean(value: str) -> str:
    """User text for a mail: control characters (CR/LF included) become spaces."""
    return _CONTROL.sub(" ", value).strip()


def compile_all() -> int:
    """Compile every mail template now (start-up) rather than for a first mail."""
    for kind in SUBJECTS:
        text_env.get_template(f"{kind}.txt")
        html_env.get_template(f"{kind}.html")
    return 2 * len(SUBJECTS)


_DIGIT_RUN = re.compile(r"\d{5,}")


def no_code_lookalike(value: str) -> str:
    """User text for a code mail: a long digit run ("Jane 123456") is split in groups of three,
    so the mail's only standalone 6-digit number is the code (mail clients, phones and QA
    suites pick the code out by that shape)."""
    return _DIGIT_RUN.sub(lambda m: " ".join(m.group()[i:i + 3] for i in range(0, len(m.group()), 3)), value)


def render(kind: str, context: dict[str, Any], *, code_in_subject: bool = False) -> tuple[str, str, str]:
    """(subject, text, html) for a message kind. A code mail's subject names its step's tag
    ("Your Computer Shop sign-in code (K7Q)"); with `code_in_subject`, the code goes at its end
    (never at the start, which phone lock screens show)."""
    ctx = {k: clean(v) if isinstance(v, str) else v for k, v in context.items()}
    if "code" in ctx:
        ctx = {k: no_code_lookalike(v) if isinstance(v, str) and k not in ("code", "link", "stop_link") else v
               for k, v in ctx.items()}
    ctx.setdefault("tag", "")
    text = text_env.get_template(f"{kind}.txt").render(ctx)
    html = html_env.get_template(f"{kind}.html").render(ctx)
    subject = SUBJECTS[kind]
    if ctx.get("tag"):
        subject += f" ({ctx['tag']})"
    if code_in_subject and ctx.get("code"):
        subject += f": {ctx['code']}"
    return subject, text, html


@dataclass(frozen=True)
class Mail:
    """A message ready for the wire: the envelope and the RFC 5322 bytes (CRLF line ends)."""

    sender: str  # envelope sender, the bare address
    recipient: str
    subject: str
    text: str
    data: bytes
    smtputf8: bool  # the recipient's address is not ASCII (RFC 6531)

    def parsed(self) -> EmailMessage:
        """The message as a mail client reads it."""
        return cast(EmailMessage, BytesParser(policy=policy.default).parsebytes(self.data))


def _part(kind: str, body: str) -> bytes:
    # Quoted-printable keeps the mostly ASCII bodies readable; "=" is always escaped in it, so
    # no body line can look like a boundary starting with "=_".
    encoded = binascii.b2a_qp(body.replace("\r\n", "\n").encode(), istext=True).replace(b"\n", b"\r\n")
    return (f'Content-Type: text/{kind}; charset="utf-8"\r\n'
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode() + encoded + b"\r\n"


@dataclass(frozen=True)
class Dkim:
    """DKIM signing (RFC 6376) with dkimpy: DKIM_DOMAIN, DKIM_SELECTOR and the private key."""

    domain: str
    selector: str
    private_key: bytes
    # Signed headers: what a receiver shows, and what makes the message itself.
    headers: tuple[bytes, ...] = (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                                  b"content-type", b"auto-submitted")

    def sign(self, data: bytes) -> bytes:
        """The DKIM-Signature header line(s) for `data` (CRLF line ends)."""
        import dkim

        return bytes(dkim.sign(data, self.selector.encode(), self.domain.encode(), self.private_key,
                               include_headers=list(self.headers), linesep=b"\r\n"))


def build(kind: str, context: dict[str, Any], *, recipient: str, sender: str, domain: str = "localhost",
          code_in_subject: bool = False, dkim: Dkim | None = None) -> Mail:
    """A multipart (text + HTML) message. Header values never carry user text but the address.

    Composed directly rather than through email.message.EmailMessage, whose header objects and
    generator cost measurably more per message (bench/README.md); tests parse what this writes."""
    subject, text, html = render(kind, context, code_in_subject=code_in_subject)
    if _CONTROL.search(recipient) or "<" in recipient or ">" in recipient:
        raise ValueError("recipient contains control or bracket characters")
    name, addr = parseaddr(sender)
    boundary = "=_" + secrets.token_hex(16)
    head = (
        f"From: {formataddr((name, addr), charset='utf-8') if name else addr}\r\n"
        f"To: {recipient}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: {make_msgid(domain=addr.rpartition('@')[2] or domain)}\r\n"
        "Auto-Submitted: auto-generated\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
    )
    mark = f"--{boundary}\r\n".encode()
    data = (head.encode() + mark + _part("plain", text) + mark + _part("html", html)
            + f"--{boundary}--\r\n".encode())
    if dkim is not None:
        data = dkim.sign(data) + data
    return Mail(addr, recipient, subject, text, data, smtputf8=not recipient.isascii())
