"""Logging: one line per record, UTC; in production the chatty library loggers are held at
WARNING and every record passes a filter that drops secrets, so no code, password or cookie
is written at any level."""

from __future__ import annotations

import logging
import re
import time

from app.settings import Settings

QUIET_IN_PRODUCTION = ("databases", "aiomysql", "aiosqlite", "sqlalchemy", "aiosmtplib", "mail.log", "httpx", "httpcore")
_SECRETS = re.compile(r"(?i)(password|passwd|code|csrf_token|cookie|session)=([^&\s]+)")
_COOKIE_HEADER = re.compile(r"(?i)(cookie:\s*)(\S+)")
# A code mail's links: their token shows the code (or ends the customer's pending steps) to
# whoever holds it, so an access log line keeps the path and drops the token.
_LINK_TOKEN = re.compile(r"(/verify/link/|/not-you/|/admin/setup/)[A-Za-z0-9_-]+")


class RedactFilter(logging.Filter):
    """Blanks name=value pairs that look like secrets, cookies and mail link tokens in the final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _LINK_TOKEN.sub(r"\1[redacted]",
                                  _COOKIE_HEADER.sub(r"\1[redacted]", _SECRETS.sub(r"\1=[redacted]", message)))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def configure_logging(settings: Settings) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_computer_shop", False) for h in root.handlers):
        handler = logging.StreamHandler()
        formatter = logging.Formatter("%(asctime)sZ %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
        handler._computer_shop = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        if root.level == logging.WARNING:
            root.setLevel(logging.INFO)
    if settings.is_production:
        for name in QUIET_IN_PRODUCTION:
            logging.getLogger(name).setLevel(logging.WARNING)
        loggers = [root] + [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
        for logger in loggers:  # uvicorn's own handlers included
            for each in logger.handlers:
                if not any(isinstance(f, RedactFilter) for f in each.filters):
                    each.addFilter(RedactFilter())
