"""Settings: one frozen, typed object built once from the environment at start-up.

Nothing else in the service reads ``os.environ``. Every problem found is reported at once,
one line each, so an operator fixes a bad deployment in one pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_INTERAKT_BASE_URL = "https://api.interakt.ai/v1/public"
DEFAULT_TEMPLATE_LANGUAGE = "en"
DEFAULT_GRPC_ADDRESS = "0.0.0.0:50051"
DEFAULT_HTTP_ADDRESS = "0.0.0.0:8080"
DEFAULT_SHUTDOWN_GRACE_SECONDS = 10.0
DEFAULT_CODE_LENGTH = 6
DEFAULT_TTL_SECONDS = 600
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RESEND_COOLDOWN_SECONDS = 30
DEFAULT_MAX_SENDS_PER_HOUR = 5
DEFAULT_BRAND = "MinServe"
DEFAULT_INTERAKT_TIMEOUT_SECONDS = 5.0
DEFAULT_REDIS_TIMEOUT_SECONDS = 1.0

MIN_CODE_LENGTH = 4
MAX_CODE_LENGTH = 10
# A development-only key, so `serve --dev` needs no configuration. Production refuses to start
# without OTP_SECRET, so this value can never protect real codes.
DEV_SECRET = "dev-only-otp-secret-not-for-production"  # noqa: S105


class ConfigError(Exception):
    """The environment does not describe a runnable service; ``problems`` has one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service needs to know about its deployment."""

    dev: bool = False
    # None only in dev mode: the service then starts a private redis-server.
    redis_url: str | None = DEFAULT_REDIS_URL
    redis_timeout_seconds: float = DEFAULT_REDIS_TIMEOUT_SECONDS
    interakt_api_key: str = dataclasses.field(default="", repr=False)
    interakt_base_url: str = DEFAULT_INTERAKT_BASE_URL
    interakt_timeout_seconds: float = DEFAULT_INTERAKT_TIMEOUT_SECONDS
    template_name: str | None = None
    template_language: str = DEFAULT_TEMPLATE_LANGUAGE
    otp_secret: bytes = dataclasses.field(default=b"", repr=False)
    grpc_address: str = DEFAULT_GRPC_ADDRESS
    # The JSON gateway, /metrics and the health endpoints; "" runs no HTTP server.
    http_address: str = DEFAULT_HTTP_ADDRESS
    shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS
    code_length: int = DEFAULT_CODE_LENGTH
    ttl_seconds: int = DEFAULT_TTL_SECONDS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    resend_cooldown_seconds: int = DEFAULT_RESEND_COOLDOWN_SECONDS
    max_sends_per_hour: int = DEFAULT_MAX_SENDS_PER_HOUR
    brand: str = DEFAULT_BRAND

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], *, dev: bool = False, gateway_only: bool = False
    ) -> Settings:
        """Build settings from environment variables; raise ConfigError listing every problem.

        ``gateway_only``: for ``otp-service gateway``, which holds no secrets, so none is required.
        """
        reader = _Reader(env)
        redis_url = reader.text("REDIS_URL", None if dev else DEFAULT_REDIS_URL)
        if redis_url is not None and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
            reader.problems.append(
                "REDIS_URL: must start with redis://, rediss:// or unix:// "
                f"(got scheme {urlsplit(redis_url).scheme!r})"
            )
        api_key = reader.text("INTERAKT_API_KEY", None)
        secret = reader.text("OTP_SECRET", None)
        if not dev and not gateway_only:
            if not api_key:
                reader.problems.append("INTERAKT_API_KEY: required in production mode")
            if not secret:
                reader.problems.append("OTP_SECRET: required in production mode")
            elif len(secret) < 16:
                reader.problems.append("OTP_SECRET: must be at least 16 characters")
        base_url = (reader.text("INTERAKT_BASE_URL", DEFAULT_INTERAKT_BASE_URL) or "").rstrip("/")
        if urlsplit(base_url).scheme not in ("http", "https") or not urlsplit(base_url).netloc:
            reader.problems.append(f"INTERAKT_BASE_URL: not an http(s) URL: {base_url!r}")
        ttl = reader.integer("OTP_TTL_SECONDS", DEFAULT_TTL_SECONDS, low=30, high=86_400)
        cooldown = reader.integer(
            "OTP_RESEND_COOLDOWN_SECONDS", DEFAULT_RESEND_COOLDOWN_SECONDS, low=0, high=3_600
        )
        settings = cls(
            dev=dev,
            redis_url=redis_url,
            redis_timeout_seconds=reader.number(
                "REDIS_TIMEOUT_SECONDS", DEFAULT_REDIS_TIMEOUT_SECONDS, low=0.05, high=30
            ),
            interakt_api_key=api_key or "",
            interakt_base_url=base_url,
            interakt_timeout_seconds=reader.number(
                "INTERAKT_TIMEOUT_SECONDS", DEFAULT_INTERAKT_TIMEOUT_SECONDS, low=0.1, high=60
            ),
            template_name=reader.text("INTERAKT_TEMPLATE_NAME", None) or None,
            template_language=reader.text("INTERAKT_TEMPLATE_LANGUAGE", DEFAULT_TEMPLATE_LANGUAGE)
            or DEFAULT_TEMPLATE_LANGUAGE,
            otp_secret=(secret or (DEV_SECRET if dev else "")).encode(),
            grpc_address=_address(reader, "OTP_GRPC_ADDRESS", DEFAULT_GRPC_ADDRESS),
            # Set but empty means "no HTTP server", unlike the other settings, where empty is unset.
            http_address=""
            if env.get("OTP_HTTP_ADDRESS", "x").strip() == ""
            else _address(reader, "OTP_HTTP_ADDRESS", DEFAULT_HTTP_ADDRESS),
            shutdown_grace_seconds=reader.number(
                "OTP_SHUTDOWN_GRACE_SECONDS", DEFAULT_SHUTDOWN_GRACE_SECONDS, low=0, high=300
            ),
            code_length=reader.integer(
                "OTP_CODE_LENGTH", DEFAULT_CODE_LENGTH, low=MIN_CODE_LENGTH, high=MAX_CODE_LENGTH
            ),
            ttl_seconds=ttl,
            max_attempts=reader.integer("OTP_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, low=1, high=100),
            resend_cooldown_seconds=cooldown,
            max_sends_per_hour=reader.integer(
                "OTP_MAX_SENDS_PER_HOUR", DEFAULT_MAX_SENDS_PER_HOUR, low=1, high=1_000
            ),
            brand=reader.text("OTP_BRAND", DEFAULT_BRAND) or DEFAULT_BRAND,
        )
        if reader.problems:
            raise ConfigError(reader.problems)
        return settings


class _Reader:
    """Reads typed values from the environment, collecting problems instead of stopping."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.problems: list[str] = []

    def text(self, name: str, default: str | None) -> str | None:
        value = self._env.get(name)
        return default if value is None or value.strip() == "" else value.strip()

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        raw = self.text(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name}: not a whole number: {raw!r}")
            return default
        if not low <= value <= high:
            self.problems.append(f"{name}: must be between {low} and {high} (got {value})")
        return value

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        raw = self.text(name, None)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name}: not a number: {raw!r}")
            return default
        if not low <= value <= high:
            self.problems.append(f"{name}: must be between {low} and {high} (got {value})")
        return value


def _address(reader: _Reader, name: str, default: str) -> str:
    value = reader.text(name, default) or default
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
        reader.problems.append(f"{name}: expected host:port, got {value!r}")
    return value
