"""Settings: one frozen, typed object built once from the environment at start-up.

Nothing else in the service reads ``os.environ``. Every problem found is reported at once,
one line each, so an operator fixes a bad deployment in one pass.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import phonenumbers

from otp_service.errors import InvalidInput
from otp_service.languages import WHATSAPP_LANGUAGES
from otp_service.phone import parse_phone

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_INTERAKT_BASE_URL = "https://api.interakt.ai/v1/public"
DEFAULT_TEMPLATE_LANGUAGE = "en"
# What production sends (INTERAKT_CHANNEL): an approved template, which reaches anyone; Text
# reaches only people who wrote to the business in the last 24 hours, and must be chosen.
CHANNELS = ("template", "text")
DEFAULT_CHANNEL = "template"
DEFAULT_GRPC_ADDRESS = "0.0.0.0:50051"
DEFAULT_HTTP_ADDRESS = "0.0.0.0:8080"
DEFAULT_SHUTDOWN_GRACE_SECONDS = 10.0
DEFAULT_SHUTDOWN_DELAY_SECONDS = 0.0
DEFAULT_CODE_LENGTH = 6
DEFAULT_TTL_SECONDS = 600
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RESEND_COOLDOWN_SECONDS = 30
DEFAULT_MAX_SENDS_PER_HOUR = 5
DEFAULT_BRAND = "MinServe"
DEFAULT_INTERAKT_TIMEOUT_SECONDS = 5.0
DEFAULT_REDIS_TIMEOUT_SECONDS = 1.0
# Replicas that must hold a new code before it is sent, and a verify's write before it is
# answered (OTP_REDIS_REPLICA_ACKS): none, as Redis itself; docs/scaling.md says when to raise it.
DEFAULT_REDIS_REPLICA_ACKS = 0
DEFAULT_CALLER_SENDS_PER_MINUTE = 120
# Interakt's Growth plan allows 300 requests a minute per account, shared by every replica.
DEFAULT_INTERAKT_SENDS_PER_MINUTE = 300
# Calling codes that codes may be sent to: the market the product serves. Everything else is
# refused, the standard defence against WhatsApp/SMS pumping to premium or far-away numbers.
DEFAULT_ALLOWED_COUNTRIES = frozenset({"91"})
DEFAULT_MAX_FAILED_VERIFIES_PER_HOUR = 10
# The circuit breaker in front of Interakt: this many upstream failures in a row open it, for
# this long.
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_COOLOFF_SECONDS = 30.0
# A weak webhook secret would let anyone forge delivery reports (a forged failure lifts a
# number's resend cooldown).
MIN_WEBHOOK_SECRET_LENGTH = 16

# OTP_SECRET keys every code's HMAC: a short one could be guessed from stolen digests.
MIN_SECRET_LENGTH = 16

MIN_CODE_LENGTH = 4
# WhatsApp's authentication templates take codes of at most 15 characters.
MAX_CODE_LENGTH = 10
# A development-only key, so `serve --dev` needs no configuration. Production refuses to start
# without OTP_SECRET, so this value can never protect real codes.
DEV_SECRET = "dev-only-otp-secret-not-for-production"  # noqa: S105
# The caller token `serve --dev` accepts when none is configured, so examples stay copy-pasteable.
# Production never accepts it: there a token must be configured (or OTP_AUTH=none set).
# The webhook secret of `serve --dev` when none is set, so that `otp-service dev report` can sign
# a report to it. Production has none: without INTERAKT_WEBHOOK_SECRET the route is off.
DEV_WEBHOOK_SECRET = "dev-only-webhook-secret-not-for-production"  # noqa: S105
DEV_CALLER = "dev"
DEV_TOKEN = "dev"  # noqa: S105
MIN_TOKEN_LENGTH = 16
_CALLER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Variables with these prefixes are ours: one the service does not read is reported (a typo).
OWN_PREFIXES = ("OTP_", "INTERAKT_", "REDIS_")
# Except what Kubernetes puts in every pod for each Service of the namespace: a Service named
# "redis" brings REDIS_SERVICE_HOST, REDIS_PORT, REDIS_PORT_6379_TCP_ADDR and the like.
_SERVICE_LINK = re.compile(
    r"[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_[A-Z]+)?)?)"
)

log = logging.getLogger(__name__)


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
    # Sentinel mode when set: where the sentinels listen and the name of the primary they watch.
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str | None = None
    redis_sentinel_password: str | None = dataclasses.field(default=None, repr=False)
    redis_replica_acks: int = DEFAULT_REDIS_REPLICA_ACKS
    interakt_api_key: str = dataclasses.field(default="", repr=False)
    interakt_base_url: str = DEFAULT_INTERAKT_BASE_URL
    interakt_timeout_seconds: float = DEFAULT_INTERAKT_TIMEOUT_SECONDS
    # Checks Interakt's delivery reports (POST /webhooks/interakt); "": the route is off.
    interakt_webhook_secret: str = dataclasses.field(default="", repr=False)
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    breaker_cooloff_seconds: float = DEFAULT_BREAKER_COOLOFF_SECONDS
    interakt_channel: str = DEFAULT_CHANNEL
    template_name: str | None = None
    # The default language, and the language by calling code (INTERAKT_TEMPLATE_LANGUAGES).
    template_language: str = DEFAULT_TEMPLATE_LANGUAGE
    template_languages: tuple[tuple[str, str], ...] = ()
    # Whether a template send carries the code for the OTP button too (an authentication
    # template has one; only an old template without it needs false).
    template_button: bool = True
    otp_secret: bytes = dataclasses.field(default=b"", repr=False)
    grpc_address: str = DEFAULT_GRPC_ADDRESS
    # The JSON gateway, /metrics and the health endpoints; "" runs no HTTP server.
    http_address: str = DEFAULT_HTTP_ADDRESS
    shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS
    # On SIGTERM, how long both ports keep serving while unready, before the drain begins.
    shutdown_delay_seconds: float = DEFAULT_SHUTDOWN_DELAY_SECONDS
    # Whether GET /metrics and /openapi.json need a caller token too (the probes never do).
    metrics_auth: bool = False
    code_length: int = DEFAULT_CODE_LENGTH
    ttl_seconds: int = DEFAULT_TTL_SECONDS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    resend_cooldown_seconds: int = DEFAULT_RESEND_COOLDOWN_SECONDS
    max_sends_per_hour: int = DEFAULT_MAX_SENDS_PER_HOUR
    brand: str = DEFAULT_BRAND
    # Caller authentication: (name, token) pairs from OTP_CLIENT_TOKENS, plus the file's, which
    # is re-read while running. auth_required=False only with OTP_AUTH=none.
    auth_required: bool = True
    client_tokens: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)
    client_tokens_file: str | None = None
    reflection: bool = True
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    caller_sends_per_minute: int = DEFAULT_CALLER_SENDS_PER_MINUTE
    interakt_sends_per_minute: int = DEFAULT_INTERAKT_SENDS_PER_MINUTE
    allowed_countries: frozenset[str] = DEFAULT_ALLOWED_COUNTRIES
    max_failed_verifies_per_hour: int = DEFAULT_MAX_FAILED_VERIFIES_PER_HOUR
    # Numbers in E.164 with their fixed code (OTP_TEST_NUMBERS): never sent, every limit holds.
    test_numbers: tuple[tuple[str, str], ...] = ()
    # Callers that may read GetOtpStatus of other callers' sends (OTP_STATUS_READERS).
    status_readers: frozenset[str] = frozenset()
    # AdminService's tokens, a file of name:token lines re-read while running; None: the admin
    # service is not served (OTP_ADMIN_TOKENS_FILE).
    admin_tokens_file: str | None = None
    # The OTP_SECRET of before a rotation: verifies still accept the codes made under it
    # (OTP_SECRET_PREVIOUS); b"": none.
    otp_secret_previous: bytes = dataclasses.field(default=b"", repr=False)
    # A file holding the Interakt key, re-read while running (INTERAKT_API_KEY_FILE); the key
    # read at start-up is in interakt_api_key.
    interakt_api_key_file: str | None = None

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], *, dev: bool = False, gateway_only: bool = False
    ) -> Settings:
        """Build settings from environment variables; raise ConfigError listing every problem.

        ``gateway_only``: for ``otp-service gateway``, which holds no secrets, so none is required.
        Every variable is read through ``_Reader``, so that the ones it never asked for are known
        to be unknown: an error in production, a warning in development mode.
        """
        reader = _Reader(env)
        sentinels = _sentinels(reader)
        sentinel_master = reader.text("REDIS_SENTINEL_MASTER", None)
        redis_url = _redis_url(reader, dev=dev, sentinels=bool(sentinels or sentinel_master))
        if bool(sentinels) != bool(sentinel_master):
            reader.problems.append("REDIS_SENTINELS, REDIS_SENTINEL_MASTER: set both or neither")
        api_key = reader.text("INTERAKT_API_KEY", None)
        api_key_file = reader.text("INTERAKT_API_KEY_FILE", None)
        if api_key_file is not None:
            if api_key:
                reader.problems.append("INTERAKT_API_KEY, INTERAKT_API_KEY_FILE: set one, not both")
            try:
                api_key = read_api_key_file(api_key_file)
            except OSError as exc:
                reader.problems.append(
                    f"INTERAKT_API_KEY_FILE: cannot read {api_key_file!r}: {type(exc).__name__}"
                )
            else:
                if not api_key:
                    reader.problems.append(f"INTERAKT_API_KEY_FILE: {api_key_file!r} is empty")
        secret = reader.text("OTP_SECRET", None)
        previous_secret = reader.text("OTP_SECRET_PREVIOUS", None) or ""
        if previous_secret and len(previous_secret) < 16:
            reader.problems.append("OTP_SECRET_PREVIOUS: must be at least 16 characters")
        if previous_secret and previous_secret == secret:
            reader.problems.append("OTP_SECRET_PREVIOUS: is OTP_SECRET itself; unset it")
        if not dev and not gateway_only:
            if not api_key:
                reader.problems.append("INTERAKT_API_KEY: required in production mode")
            if not secret:
                reader.problems.append("OTP_SECRET: required in production mode")
            elif len(secret) < MIN_SECRET_LENGTH:
                reader.problems.append(
                    f"OTP_SECRET: must be at least {MIN_SECRET_LENGTH} characters"
                )
        channel, template_name = _channel(reader, dev=dev, gateway_only=gateway_only)
        webhook_secret = reader.text("INTERAKT_WEBHOOK_SECRET", None) or (
            DEV_WEBHOOK_SECRET if dev else ""
        )
        if webhook_secret and len(webhook_secret) < MIN_WEBHOOK_SECRET_LENGTH:
            reader.problems.append(
                f"INTERAKT_WEBHOOK_SECRET: must be at least {MIN_WEBHOOK_SECRET_LENGTH} characters"
            )
        base_url = (reader.text("INTERAKT_BASE_URL", DEFAULT_INTERAKT_BASE_URL) or "").rstrip("/")
        base_parts = urlsplit(base_url)
        if base_parts.scheme not in ("http", "https") or not base_parts.netloc:
            reader.problems.append(f"INTERAKT_BASE_URL: not an http(s) URL: {base_url!r}")
        elif base_parts.scheme == "http" and not dev and not _loopback(base_parts.hostname):
            # The API key and every code would travel in clear; a local egress proxy or sidecar
            # on the pod's loopback is the one exception.
            reader.problems.append(
                f"INTERAKT_BASE_URL: must be https:// in production (got {base_url!r}); "
                "http:// is allowed only to a loopback address (127.0.0.0/8, ::1, localhost)"
            )
        ttl = reader.integer("OTP_TTL_SECONDS", DEFAULT_TTL_SECONDS, low=30, high=86_400)
        cooldown = reader.integer(
            "OTP_RESEND_COOLDOWN_SECONDS", DEFAULT_RESEND_COOLDOWN_SECONDS, low=0, high=3_600
        )
        auth = (reader.text("OTP_AUTH", "token") or "token").lower()
        if auth not in ("token", "none"):
            reader.problems.append(f"OTP_AUTH: must be 'token' or 'none' (got {auth!r})")
        tokens = _client_tokens(reader)
        tokens_file = reader.text("OTP_CLIENT_TOKENS_FILE", None)
        file_tokens: tuple[tuple[str, str], ...] = ()
        if tokens_file is not None:
            # Strict at start-up, unlike the reloads while running (auth.Callers), which skip a
            # bad line: a deployment with a broken file is refused while someone watches it.
            try:
                file_tokens, problems = read_client_tokens_file(tokens_file)
            except OSError as exc:
                problems = [f"cannot read {tokens_file!r}: {type(exc).__name__}"]
            reader.problems.extend(f"OTP_CLIENT_TOKENS_FILE: {p}" for p in problems)
        admin_file = reader.text("OTP_ADMIN_TOKENS_FILE", None)
        if admin_file is not None:
            try:
                admin_tokens, problems = read_client_tokens_file(admin_file)
            except OSError as exc:
                admin_tokens, problems = (), [f"cannot read {admin_file!r}: {type(exc).__name__}"]
            reader.problems.extend(f"OTP_ADMIN_TOKENS_FILE: {p}" for p in problems)
            # A token of both kinds would open each surface to the other's holders.
            shared = {t for _, t in admin_tokens} & {t for _, t in (*tokens, *file_tokens)}
            if shared:
                reader.problems.append(
                    f"OTP_ADMIN_TOKENS_FILE: {len(shared)} token(s) are caller tokens too; an "
                    "admin token must be its own"
                )
        metrics_auth = reader.boolean("OTP_METRICS_AUTH", False)
        if auth == "token" and not tokens and not file_tokens:
            if dev:
                tokens = ((DEV_CALLER, DEV_TOKEN),)
            elif not gateway_only:  # the gateway forwards callers' tokens; it checks none
                reader.problems.append(
                    "OTP_CLIENT_TOKENS / OTP_CLIENT_TOKENS_FILE: at least one caller token is "
                    "required in production mode (OTP_AUTH=none turns caller authentication off)"
                )
            elif metrics_auth:
                reader.problems.append(
                    "OTP_METRICS_AUTH: needs OTP_CLIENT_TOKENS or OTP_CLIENT_TOKENS_FILE to check"
                )
        if metrics_auth and auth == "none":
            reader.problems.append("OTP_METRICS_AUTH: cannot be on with OTP_AUTH=none")
        template_language = _language(
            reader, "INTERAKT_TEMPLATE_LANGUAGE", reader.text("INTERAKT_TEMPLATE_LANGUAGE", None)
        )
        tls_cert, tls_key = _path(reader, "OTP_TLS_CERT"), _path(reader, "OTP_TLS_KEY")
        tls_client_ca = _path(reader, "OTP_TLS_CLIENT_CA")
        if (tls_cert is None) != (tls_key is None):
            reader.problems.append("OTP_TLS_CERT, OTP_TLS_KEY: set both or neither")
        if tls_client_ca is not None and tls_cert is None:
            reader.problems.append("OTP_TLS_CLIENT_CA: needs OTP_TLS_CERT and OTP_TLS_KEY")
        settings = cls(
            dev=dev,
            redis_url=redis_url,
            redis_timeout_seconds=reader.number(
                "REDIS_TIMEOUT_SECONDS", DEFAULT_REDIS_TIMEOUT_SECONDS, low=0.05, high=30
            ),
            redis_sentinels=sentinels,
            redis_sentinel_master=sentinel_master,
            redis_sentinel_password=reader.text("REDIS_SENTINEL_PASSWORD", None),
            redis_replica_acks=reader.integer(
                "OTP_REDIS_REPLICA_ACKS", DEFAULT_REDIS_REPLICA_ACKS, low=0, high=16
            ),
            interakt_api_key=api_key or "",
            interakt_base_url=base_url,
            interakt_timeout_seconds=reader.number(
                "INTERAKT_TIMEOUT_SECONDS", DEFAULT_INTERAKT_TIMEOUT_SECONDS, low=0.1, high=60
            ),
            interakt_webhook_secret=webhook_secret,
            breaker_failures=reader.integer(
                "INTERAKT_BREAKER_FAILURES", DEFAULT_BREAKER_FAILURES, low=1, high=1_000
            ),
            breaker_cooloff_seconds=reader.number(
                "INTERAKT_BREAKER_COOLOFF_SECONDS",
                DEFAULT_BREAKER_COOLOFF_SECONDS,
                low=0.1,
                high=3_600,
            ),
            interakt_channel=channel,
            template_name=template_name,
            template_language=template_language or DEFAULT_TEMPLATE_LANGUAGE,
            template_languages=_template_languages(reader),
            template_button=reader.boolean("INTERAKT_TEMPLATE_BUTTON", True),
            otp_secret=(secret or (DEV_SECRET if dev else "")).encode(),
            grpc_address=_address(reader, "OTP_GRPC_ADDRESS", DEFAULT_GRPC_ADDRESS),
            # Set but empty means "no HTTP server", unlike the other settings, where empty is unset.
            http_address=""
            if reader.blank("OTP_HTTP_ADDRESS")
            else _address(reader, "OTP_HTTP_ADDRESS", DEFAULT_HTTP_ADDRESS),
            metrics_auth=metrics_auth,
            shutdown_grace_seconds=reader.number(
                "OTP_SHUTDOWN_GRACE_SECONDS", DEFAULT_SHUTDOWN_GRACE_SECONDS, low=0, high=300
            ),
            shutdown_delay_seconds=reader.number(
                "OTP_SHUTDOWN_DELAY_SECONDS", DEFAULT_SHUTDOWN_DELAY_SECONDS, low=0, high=300
            ),
            code_length=(
                code_length := reader.integer(
                    "OTP_CODE_LENGTH",
                    DEFAULT_CODE_LENGTH,
                    low=MIN_CODE_LENGTH,
                    high=MAX_CODE_LENGTH,
                )
            ),
            ttl_seconds=ttl,
            max_attempts=reader.integer("OTP_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, low=1, high=100),
            resend_cooldown_seconds=cooldown,
            max_sends_per_hour=reader.integer(
                "OTP_MAX_SENDS_PER_HOUR", DEFAULT_MAX_SENDS_PER_HOUR, low=1, high=1_000
            ),
            brand=reader.text("OTP_BRAND", DEFAULT_BRAND) or DEFAULT_BRAND,
            auth_required=auth != "none",
            client_tokens=tokens,
            client_tokens_file=tokens_file,
            reflection=reader.boolean("OTP_REFLECTION", True),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            caller_sends_per_minute=reader.integer(
                "OTP_CALLER_SENDS_PER_MINUTE", DEFAULT_CALLER_SENDS_PER_MINUTE, low=1, high=100_000
            ),
            interakt_sends_per_minute=reader.integer(
                "INTERAKT_SENDS_PER_MINUTE",
                DEFAULT_INTERAKT_SENDS_PER_MINUTE,
                low=1,
                high=100_000,
            ),
            allowed_countries=_countries(reader),
            max_failed_verifies_per_hour=reader.integer(
                "OTP_MAX_FAILED_VERIFIES_PER_HOUR",
                DEFAULT_MAX_FAILED_VERIFIES_PER_HOUR,
                low=1,
                high=1_000,
            ),
            test_numbers=(test_numbers := _test_numbers(reader, code_length)),
            status_readers=_status_readers(reader),
            admin_tokens_file=admin_file,
            otp_secret_previous=previous_secret.encode(),
            interakt_api_key_file=api_key_file,
        )
        allow_test_numbers = reader.boolean("OTP_ALLOW_TEST_NUMBERS", False)
        if test_numbers and not dev and not allow_test_numbers:
            # A fixed code is a backdoor to every account on that number: production has one
            # only when an operator says so, explicitly.
            reader.problems.append(
                "OTP_TEST_NUMBERS: test numbers have fixed codes anyone may use; production "
                "refuses them unless OTP_ALLOW_TEST_NUMBERS=true"
            )
        for name in reader.unknown():
            problem = f"{name}: not a variable otp-service reads (a typo?)"
            if not dev:
                reader.problems.append(problem)
            else:
                log.warning(problem, extra={"event": "config_unknown_variable"})
        if reader.problems:
            raise ConfigError(reader.problems)
        return settings


_N = TypeVar("_N", int, float)


class _Reader:
    """Reads typed values from the environment, collecting problems instead of stopping."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self._asked: set[str] = set()
        self.problems: list[str] = []

    def text(self, name: str, default: str | None) -> str | None:
        value = self._raw(name)
        return default if value is None or value.strip() == "" else value.strip()

    def blank(self, name: str) -> bool:
        """Whether ``name`` is set but empty (for the one setting where that means "off")."""
        value = self._raw(name)
        return value is not None and value.strip() == ""

    def unknown(self) -> list[str]:
        """Our variables (OWN_PREFIXES) in the environment that nothing asked for."""
        return sorted(
            name
            for name in self._env
            if name.startswith(OWN_PREFIXES)
            and name not in self._asked
            and not _SERVICE_LINK.fullmatch(name)
        )

    def _raw(self, name: str) -> str | None:
        self._asked.add(name)
        return self._env.get(name)

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        return self._ranged(name, default, low, high, int, "a whole number")

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        return self._ranged(name, default, low, high, float, "a number")

    def _ranged(
        self, name: str, default: _N, low: _N, high: _N, kind: Callable[[str], _N], what: str
    ) -> _N:
        raw = self.text(name, None)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            self.problems.append(f"{name}: not {what}: {raw!r}")
            return default
        if not low <= value <= high:
            self.problems.append(f"{name}: must be between {low} and {high} (got {value})")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name, None)
        if raw is None:
            return default
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        self.problems.append(f"{name}: must be true or false (got {raw!r})")
        return default


def parse_client_tokens(
    entries: list[str], *, what: str = "entry"
) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """Parse ``name:token`` entries; return the good ones and one problem per bad one.

    A problem names the entry by ``what`` and its position only: never a name, which could be
    a token written in the wrong place. Blank entries and ``#`` comments are skipped. A name may
    appear twice (old and new token while rotating); a token may not, or a call could not be
    told apart.
    """
    tokens: list[tuple[str, str]] = []
    problems: list[str] = []
    for number, line in enumerate(entries, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, token = (part.strip() for part in entry.partition(":"))
        if not sep or not _CALLER_NAME.fullmatch(name):
            problems.append(
                f"{what} {number}: expected name:token, the name of letters, digits, '.', '_', '-'"
            )
        elif len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
            problems.append(
                f"{what} {number}: the token must be at least {MIN_TOKEN_LENGTH} printable "
                "characters without spaces"
            )
        elif any(token == known for _, known in tokens):
            problems.append(f"{what} {number}: the same token is given twice")
        else:
            tokens.append((name, token))
    return tuple(tokens), problems


def read_api_key_file(path: str) -> str:
    """The Interakt key a file holds (surrounding whitespace dropped); OSError when unreadable."""
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.read().strip()


def read_client_tokens_file(path: str) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """A tokens file's good entries and one problem per bad line; OSError when unreadable."""
    # Bytes that are not UTF-8 become characters no name or token may hold: the line they are
    # on is bad, not the whole file.
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        lines = list(file)
    return parse_client_tokens(lines, what="line")


def _client_tokens(reader: _Reader) -> tuple[tuple[str, str], ...]:
    raw = reader.text("OTP_CLIENT_TOKENS", None)
    if raw is None:
        return ()
    tokens, problems = parse_client_tokens(raw.split(","))
    reader.problems.extend(f"OTP_CLIENT_TOKENS: {problem}" for problem in problems)
    return tokens


_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def _redis_url(reader: _Reader, *, dev: bool, sentinels: bool) -> str | None:
    """REDIS_URL, checked for the deployment it names: one Redis, a Cluster, or Sentinel's."""
    default = None if dev else DEFAULT_REDIS_URL
    if sentinels:
        # The sentinels name the primary; the URL gives only credentials, database and TLS.
        default = "redis://"
    url = reader.text("REDIS_URL", default)
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in _REDIS_SCHEMES:
        reader.problems.append(
            "REDIS_URL: must start with redis://, rediss://, unix://, redis+cluster:// or "
            f"rediss+cluster:// (got scheme {parts.scheme!r})"
        )
    elif sentinels and (parts.scheme not in ("redis", "rediss") or parts.hostname):
        reader.problems.append(
            "REDIS_URL: with REDIS_SENTINELS the sentinels name the primary; give only "
            "credentials, database and TLS options, as redis[s]://[user:password@]/db"
        )
    elif parts.scheme.endswith("+cluster"):
        try:
            parse_host_ports(parts.netloc.rpartition("@")[2])
        except ValueError as exc:
            reader.problems.append(f"REDIS_URL: cluster nodes: {exc}")
        if parts.path.strip("/") not in ("", "0"):
            reader.problems.append("REDIS_URL: a Redis Cluster has only database 0")
    return url


def parse_host_ports(text: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` as pairs (``[v6]:port`` too); raise ValueError naming a bad one."""
    pairs = []
    for entry in text.split(","):
        host, _, port = entry.strip().rpartition(":")
        if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65_536:
            raise ValueError(f"expected host:port, got {entry.strip()!r}")
        pairs.append((host.strip("[]"), int(port)))
    return tuple(pairs)


def _sentinels(reader: _Reader) -> tuple[tuple[str, int], ...]:
    raw = reader.text("REDIS_SENTINELS", None)
    if raw is None:
        return ()
    try:
        return parse_host_ports(raw)
    except ValueError as exc:
        reader.problems.append(f"REDIS_SENTINELS: {exc}")
        return ()


def _countries(reader: _Reader) -> frozenset[str]:
    raw = reader.text("OTP_ALLOWED_COUNTRIES", None)
    if raw is None:
        return DEFAULT_ALLOWED_COUNTRIES
    codes = frozenset(code.strip().lstrip("+") for code in raw.split(",") if code.strip())
    unknown = sorted(
        c
        for c in codes
        if not c.isdigit() or phonenumbers.region_code_for_country_code(int(c)) == "ZZ"
    )
    if unknown or not codes:
        reader.problems.append(
            f"OTP_ALLOWED_COUNTRIES: expected calling codes such as 91,44 (not ones: {unknown})"
        )
    return codes


def _test_numbers(reader: _Reader, code_length: int) -> tuple[tuple[str, str], ...]:
    """OTP_TEST_NUMBERS: ``+E164:code`` entries, each number once, codes of ``code_length``."""
    raw = reader.text("OTP_TEST_NUMBERS", None)
    if raw is None:
        return ()
    numbers: dict[str, str] = {}
    for position, entry in enumerate(raw.split(","), start=1):
        if not entry.strip():
            continue
        number, _, code = (part.strip() for part in entry.partition(":"))
        problem = f"OTP_TEST_NUMBERS: entry {position}"
        try:
            e164 = parse_phone(number).e164
        except InvalidInput as exc:
            reader.problems.append(f"{problem}: expected +number:code; the number {exc.problem}")
            continue
        if not (code.isascii() and code.isdigit() and len(code) == code_length):
            reader.problems.append(f"{problem} ({e164}): the code must be {code_length} digits")
        elif e164 in numbers:
            reader.problems.append(f"{problem} ({e164}): the number is given twice")
        else:
            numbers[e164] = code
    return tuple(numbers.items())


def _channel(reader: _Reader, *, dev: bool, gateway_only: bool) -> tuple[str, str | None]:
    """INTERAKT_CHANNEL and INTERAKT_TEMPLATE_NAME: production sends a template unless Text is
    chosen, since Text reaches only people who wrote to the business in the last 24 hours."""
    channel = (reader.text("INTERAKT_CHANNEL", DEFAULT_CHANNEL) or DEFAULT_CHANNEL).lower()
    name = reader.text("INTERAKT_TEMPLATE_NAME", None)
    if channel not in CHANNELS:
        reader.problems.append(f"INTERAKT_CHANNEL: must be 'template' or 'text' (got {channel!r})")
    elif channel == "text" and name:
        reader.problems.append(
            "INTERAKT_TEMPLATE_NAME: set, but INTERAKT_CHANNEL=text sends no template; "
            "unset one of them"
        )
    elif channel == "template" and not name and not dev and not gateway_only:
        reader.problems.append(
            "INTERAKT_TEMPLATE_NAME: required in production mode (an approved authentication "
            "template, docs/interakt.md), unless INTERAKT_CHANNEL=text is chosen"
        )
    return channel, name


def _language(reader: _Reader, name: str, value: str | None) -> str | None:
    if value is not None and value not in WHATSAPP_LANGUAGES:
        reader.problems.append(
            f"{name}: {value[:16]!r} is not one of WhatsApp's template languages "
            "(such as en, en_US, hi, pt_BR: docs/interakt.md)"
        )
    return value


def _template_languages(reader: _Reader) -> tuple[tuple[str, str], ...]:
    """INTERAKT_TEMPLATE_LANGUAGES: ``calling code:language`` entries, e.g. ``91:hi,44:en_GB``."""
    raw = reader.text("INTERAKT_TEMPLATE_LANGUAGES", None)
    if raw is None:
        return ()
    entries: dict[str, str] = {}
    for position, entry in enumerate(raw.split(","), start=1):
        if not entry.strip():
            continue
        code, _, language = (part.strip() for part in entry.partition(":"))
        code = code.lstrip("+")
        problem = f"INTERAKT_TEMPLATE_LANGUAGES: entry {position}"
        if not code.isdigit() or phonenumbers.region_code_for_country_code(int(code)) == "ZZ":
            reader.problems.append(f"{problem}: expected callingcode:language, such as 91:hi")
        elif code in entries:
            reader.problems.append(f"{problem}: +{code} is given twice")
        elif _language(reader, problem, language) is not None:
            entries[code] = language
    return tuple(entries.items())


def _status_readers(reader: _Reader) -> frozenset[str]:
    raw = reader.text("OTP_STATUS_READERS", None)
    if raw is None:
        return frozenset()
    names = frozenset(name.strip() for name in raw.split(",") if name.strip())
    if not names or not all(_CALLER_NAME.fullmatch(name) for name in names):
        reader.problems.append(
            "OTP_STATUS_READERS: expected caller names (as in OTP_CLIENT_TOKENS), comma-separated"
        )
    return names


def _loopback(host: str | None) -> bool:
    """Whether ``host`` names this machine only: localhost, 127.0.0.0/8 or ::1."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _path(reader: _Reader, name: str) -> str | None:
    path = reader.text(name, None)
    if path is not None and not os.access(path, os.R_OK):
        reader.problems.append(f"{name}: cannot read {path!r}")
    return path


def _address(reader: _Reader, name: str, default: str) -> str:
    value = reader.text(name, default) or default
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
        reader.problems.append(f"{name}: expected host:port, got {value!r}")
    return value
