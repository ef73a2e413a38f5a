"""Settings from the environment or a `.env` file, as a frozen dataclass."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from starlette.config import Config

ENVIRONMENTS = ("development", "test", "production")
SMTP_SECURITY = ("none", "starttls", "tls")
DEV_KEY_FILE = Path(".dev-secret-key")


SESSION_LONGEST = 30 * 24 * 3600  # seconds: no session outlives the clean-up's 30 days of history


class SettingsError(ValueError):
    """The configuration cannot be used; the message says what to change."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Settings:
    app_env: str = "development"
    database_url: str = "sqlite+aiosqlite:///./shop.db"
    secret_key: str = ""
    secret_key_fallbacks: tuple[str, ...] = ()  # older keys: still open sessions and queued mail
    public_origin: str | None = None  # https://shop.example: redirects to HTTPS and links in mail
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_security: str = "starttls"
    smtp_timeout: float = 10.0
    smtp_pool_size: int = 8  # connections kept open while mail is quiet
    smtp_pool_max: int = 32  # connections at most, opened while mail waits
    mail_code_in_subject: str = "off"  # off | end
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_private_key: str | None = None  # a path to the PEM private key
    mail_from: str = "Computer Shop <no-reply@localhost>"
    mail_max_tries: int = 20  # a mail without a code: 2 s, 4 s, ... then every 5 min, about an hour in all
    otp_registration_ttl: int = 900
    otp_login_ttl: int = 600
    otp_resend_cooldown: int = 60
    otp_max_attempts: int = 5
    otp_lockout_schedule: tuple[int, ...] = (60, 300, 900, 3600)
    otp_cleanup_interval: int = 300
    rate_limit_storage: str = "memory://"
    rate_limit: str = "20/minute"
    login_account_rate_limit: str = "10/15minutes"
    trusted_proxies: tuple[Network, ...] = field(default_factory=tuple)
    session_idle_timeout: int = 1800
    session_absolute_timeout: int = 43200
    db_pool_size: int = 10
    database_failover: tuple[tuple[str, int], ...] = ()  # further nodes (Galera), host and port each
    hash_concurrency: int = 0  # Argon2 runs at once per process; 0: cores (÷ WEB_CONCURRENCY)
    loop_monitor: bool = False
    trusted_device_days: int = 30  # "Don't ask again on this device" lasts this long (0: not offered)
    reauth_minutes: int = 10  # adding or removing a way to sign in needs a sign-in this recent
    webauthn_rp_id: str | None = None  # passkeys' relying party id; default: PUBLIC_ORIGIN's host

    def __post_init__(self) -> None:
        if self.app_env not in ENVIRONMENTS:
            raise SettingsError(f"APP_ENV must be one of {', '.join(ENVIRONMENTS)}, not {self.app_env!r}")
        if self.smtp_security not in SMTP_SECURITY:
            raise SettingsError(f"SMTP_SECURITY must be one of {', '.join(SMTP_SECURITY)}")
        if self.smtp_pool_size < 1 or self.smtp_pool_max < self.smtp_pool_size:
            raise SettingsError("SMTP_POOL_SIZE must be at least 1, and SMTP_POOL_MAX at least SMTP_POOL_SIZE")
        if self.mail_code_in_subject not in ("off", "end"):
            raise SettingsError("MAIL_CODE_IN_SUBJECT is off or end (never at the start: lock screens show it)")
        dkim = (self.dkim_domain, self.dkim_selector, self.dkim_private_key)
        if any(dkim) and not all(dkim):
            raise SettingsError("DKIM needs all of DKIM_DOMAIN, DKIM_SELECTOR and DKIM_PRIVATE_KEY")
        if self.dkim_private_key and not Path(self.dkim_private_key).is_file():
            raise SettingsError(f"DKIM_PRIVATE_KEY: no file at {self.dkim_private_key}")
        if self.hash_concurrency < 0:
            raise SettingsError("HASH_CONCURRENCY must be 0 (one per core) or a positive number")
        if not self.database_url.startswith(("sqlite+aiosqlite://", "mysql+aiomysql://")):
            raise SettingsError("DATABASE_URL must start with sqlite+aiosqlite:// or mysql+aiomysql://")
        if self.database_failover and self.is_sqlite:
            raise SettingsError("DATABASE_FAILOVER lists further MariaDB nodes: DATABASE_URL must be mysql+aiomysql://")
        if len(self.secret_key.encode()) < 32:
            raise SettingsError("SECRET_KEY must be at least 32 bytes (try: python -c 'import secrets; print(secrets.token_urlsafe(48))')")
        if self.is_production and not self.smtp_host:
            raise SettingsError("production needs SMTP_HOST: codes are never printed in production")
        for old in self.secret_key_fallbacks:
            if len(old.encode()) < 32:
                raise SettingsError("each key in SECRET_KEY_FALLBACKS must be at least 32 bytes")
        if self.public_origin is not None:
            parts = urlsplit(self.public_origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
                raise SettingsError("PUBLIC_ORIGIN is a scheme and host only, like https://shop.example")
        if self.is_production and not (self.public_origin or "").startswith("https://"):
            raise SettingsError("production needs PUBLIC_ORIGIN, the https:// address customers use "
                                "(plain HTTP is redirected there, and mail links point to it)")
        if self.trusted_device_days < 0 or self.reauth_minutes <= 0:
            raise SettingsError("TRUSTED_DEVICE_DAYS must be 0 or more, REAUTH_MINUTES positive")
        if not 0 < self.session_idle_timeout <= self.session_absolute_timeout <= SESSION_LONGEST:
            # The clean-up forgets sessions last seen 30 days ago (app/otp/cleanup.py HISTORY_KEPT).
            raise SettingsError("SESSION_IDLE_TIMEOUT must be positive and at most SESSION_ABSOLUTE_TIMEOUT, "
                                f"which is at most {SESSION_LONGEST} s (30 days)")
        for name in ("otp_registration_ttl", "otp_login_ttl", "otp_max_attempts", "session_idle_timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name.upper()} must be positive")

    @property
    def is_production(self) -> bool:
        return self.app_env == "production"

    @property
    def is_development(self) -> bool:
        return self.app_env == "development"

    @property
    def is_test(self) -> bool:
        return self.app_env == "test"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def session_cookie(self) -> str:
        # The __Host- prefix makes the browser insist on Secure, path=/ and no Domain.
        return "__Host-session" if self.is_production else "session"


def _dev_secret_key() -> str:
    """Generate a development key once and keep it in a local, git-ignored file."""
    if DEV_KEY_FILE.exists():
        return DEV_KEY_FILE.read_text().strip()
    key = secrets.token_urlsafe(48)
    DEV_KEY_FILE.write_text(key + "\n")
    DEV_KEY_FILE.chmod(0o600)
    return key


def parse_networks(value: str) -> tuple[Network, ...]:
    """Parse TRUSTED_PROXIES: comma-separated addresses or networks."""
    try:
        return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in value.split(",") if p.strip())
    except ValueError as exc:
        raise SettingsError(f"TRUSTED_PROXIES: {exc}") from exc


def _host(name: str) -> bool:
    """A host name, an IPv4 address, or an IPv6 address (written in brackets: urlsplit drops them)."""
    if ":" not in name:
        return re.fullmatch(r"[a-z0-9._-]+", name) is not None
    try:
        ipaddress.IPv6Address(name)
    except ValueError:
        return False
    return True


def parse_nodes(value: str) -> tuple[tuple[str, int], ...]:
    """Parse DATABASE_FAILOVER: comma-separated host:port (port 3306 when left out; [v6]:port)."""
    nodes = []
    for item in (p.strip() for p in value.split(",")):
        if not item:
            continue
        parts = urlsplit(f"//{item}")
        try:
            port = parts.port or 3306
        except ValueError:
            port = 0
        host = parts.hostname or ""
        if not _host(host) or parts.netloc != item or "@" in item or port == 0:
            raise SettingsError(f"DATABASE_FAILOVER: {item!r} is not host:port (a comma-separated list, "
                                "like db2.internal:3306,db3.internal:3306)")
        nodes.append((host, port))
    return tuple(nodes)


def load_settings(env_file: str | os.PathLike[str] | None = ".env", **overrides: object) -> Settings:
    """Read settings from the environment (which wins) and an optional `.env` file."""
    config = Config(Path(env_file) if env_file and Path(env_file).exists() else None)
    env = config("APP_ENV", default="development")
    secret = config("SECRET_KEY", default="")
    if not secret and env == "development":
        secret = _dev_secret_key()
    try:
        values: dict[str, object] = {
            "app_env": env,
            "database_url": config("DATABASE_URL", default=Settings.database_url),
            "secret_key": secret,
            "secret_key_fallbacks": tuple(k.strip() for k in config("SECRET_KEY_FALLBACKS", default="").split(",")
                                          if k.strip()),
            "public_origin": (config("PUBLIC_ORIGIN", default="") or "").rstrip("/") or None,
            "smtp_host": config("SMTP_HOST", default=None) or None,
            "smtp_port": config("SMTP_PORT", cast=int, default=587),
            "smtp_username": config("SMTP_USERNAME", default=None) or None,
            "smtp_password": config("SMTP_PASSWORD", default=None) or None,
            "smtp_security": config("SMTP_SECURITY", default="starttls").lower(),
            "smtp_timeout": config("SMTP_TIMEOUT", cast=float, default=10.0),
            "smtp_pool_size": config("SMTP_POOL_SIZE", cast=int, default=8),
            "smtp_pool_max": config("SMTP_POOL_MAX", cast=int, default=32),
            "mail_code_in_subject": config("MAIL_CODE_IN_SUBJECT", default="off").lower(),
            "dkim_domain": config("DKIM_DOMAIN", default=None) or None,
            "dkim_selector": config("DKIM_SELECTOR", default=None) or None,
            "dkim_private_key": config("DKIM_PRIVATE_KEY", default=None) or None,
            "mail_from": config("MAIL_FROM", default=Settings.mail_from),
            "otp_registration_ttl": config("OTP_REGISTRATION_TTL", cast=int, default=900),
            "otp_login_ttl": config("OTP_LOGIN_TTL", cast=int, default=600),
            "otp_resend_cooldown": config("OTP_RESEND_COOLDOWN", cast=int, default=60),
            "otp_max_attempts": config("OTP_MAX_ATTEMPTS", cast=int, default=5),
            "otp_cleanup_interval": config("OTP_CLEANUP_INTERVAL", cast=int, default=300),
            "rate_limit_storage": config("RATE_LIMIT_STORAGE", default="memory://"),
            "rate_limit": config("RATE_LIMIT", default="20/minute"),
            "login_account_rate_limit": config("LOGIN_ACCOUNT_RATE_LIMIT", default="10/15minutes"),
            "trusted_proxies": parse_networks(config("TRUSTED_PROXIES", default="")),
            "session_idle_timeout": config("SESSION_IDLE_TIMEOUT", cast=int, default=1800),
            "session_absolute_timeout": config("SESSION_ABSOLUTE_TIMEOUT", cast=int, default=43200),
            "db_pool_size": config("DB_POOL_SIZE", cast=int, default=10),
            "database_failover": parse_nodes(config("DATABASE_FAILOVER", default="")),
            "hash_concurrency": config("HASH_CONCURRENCY", cast=int, default=0),
            "loop_monitor": config("LOOP_MONITOR", cast=bool, default=False),
            "trusted_device_days": config("TRUSTED_DEVICE_DAYS", cast=int, default=30),
            "reauth_minutes": config("REAUTH_MINUTES", cast=int, default=10),
            "webauthn_rp_id": config("WEBAUTHN_RP_ID", default=None) or None,
        }
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]
