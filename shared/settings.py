"""Configuration from HEALTHGATE_* environment variables (CONTRACT §2), validated once at start."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IpNetworks = Annotated[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], NoDecode]

# The longest duration a setting may give: a year for periods, a century for retentions.
MAX_SECONDS = 365 * 86400
MAX_DAYS = 100 * 365
MAX_HOURS = MAX_DAYS * 24

DEFAULT_HEALTH_PORTS = {"api": 8080, "poller": 8081, "gate": 8082, "pruner": 8083, "notifier": 8084}


class SettingsError(Exception):
    """A configuration value is invalid; the message is one line an operator can act on."""


class ServiceConfigError(Exception):
    """Valid settings that a service still cannot use (e.g. unreadable TLS files); it must not start."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEALTHGATE_", extra="ignore", frozen=True)

    database_url: str = "postgresql://postgres@localhost:5432/healthgate"
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    exchange: str = Field("healthgate", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    api_host: str = "127.0.0.1"
    api_port: int = Field(8080, ge=0, le=65535)
    key_file: Path = Path("./var/health-check.key")
    poll_interval_seconds: int = Field(300, ge=10, le=86400)
    check_timeout_seconds: float = Field(10, ge=0.1, le=60)
    # Durations have an upper bound and are finite: each is added to or taken from the present, in Python
    # (timedelta, datetime) or PostgreSQL (make_interval, timestamptz), and a value out of their range
    # (`1e300`, `inf`) passed validation before and then failed every evaluation of a waiting job (its
    # job.start dead-lettered, the timers looping on "timestamp out of range"), or the pruner at start.
    gate_retry_seconds: float = Field(300, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    # What a job.start for a host healthgate does not know gets (CONTRACT §2, §5).
    gate_unknown_host: Literal["release", "fail"] = "release"
    result_retention_hours: float = Field(96, gt=0, le=MAX_HOURS, allow_inf_nan=False)
    prune_interval_seconds: float = Field(3600, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    # Not in the contract's table: how long decided gate jobs and sent outbox rows are kept.
    job_retention_days: float = Field(30, gt=0, le=MAX_DAYS, allow_inf_nan=False)
    outbox_retention_hours: float = Field(24, gt=0, le=MAX_HOURS, allow_inf_nan=False)
    # Not in the contract's table: the most connections any one pool of a process holds (None: each pool's own
    # size, 3 to 20), for a PostgreSQL with few connection slots for many processes (`pool_max_size`).
    database_pool_max: int | None = Field(None, ge=2, le=1000)
    health_allowed_networks: IpNetworks = Field(
        default=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    )
    agent_ca_file: Path | None = None
    agent_cert_file: Path | None = None
    agent_key_file: Path | None = None
    blocked_networks: IpNetworks = Field(
        default=(
            ipaddress.ip_network("169.254.0.0/16"),
            ipaddress.ip_network("100.100.100.200/32"),
            ipaddress.ip_network("fd00:ec2::254/128"),
        )
    )
    # The notifier (CONTRACT §7): the first retry of a failed delivery after this, doubling up to 10 min (tests use a
    # fraction of a second); how long one POST may take; how many POSTs one process has in flight to one channel.
    notifier_retry_seconds: float = Field(10, gt=0, le=600, allow_inf_nan=False)
    notifier_timeout_seconds: float = Field(10, ge=0.1, le=60, allow_inf_nan=False)
    notifier_concurrency: int = Field(32, ge=1, le=1000)
    # CONTRACT §2: json, or text when stderr is a terminal (a person reads it); an explicit value wins.
    log_format: Literal["json", "text"] = Field(default_factory=lambda: default_log_format())
    health_port: int | None = Field(None, ge=0, le=65535)

    @field_validator("health_allowed_networks", "blocked_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value: object) -> object:
        if isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
            try:
                return tuple(ipaddress.ip_network(item, strict=False) for item in items)
            except ValueError as exc:
                raise ValueError(f"not a comma-separated list of networks: {exc}") from None
        return value

    def pool_max_size(self, wanted: int) -> int:
        """A pool's size: `wanted`, at most HEALTHGATE_DATABASE_POOL_MAX."""
        return wanted if self.database_pool_max is None else min(wanted, self.database_pool_max)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        return _with_valid_port(value)

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("amqp", "amqps"):
            raise ValueError("must be an amqp:// or amqps:// URL")
        return _with_valid_port(value)

    @field_validator("log_format", mode="before")
    @classmethod
    def _empty_log_format_is_default(cls, value: object) -> object:
        return default_log_format() if value == "" else value

    @field_validator("agent_ca_file", "agent_cert_file", "agent_key_file", mode="before")
    @classmethod
    def _empty_file_is_unset(cls, value: object) -> object:
        # `HEALTHGATE_AGENT_CA_FILE=` (compose's `${VAR:-}`) means unset, not the current directory.
        return None if value == "" else value

    @field_validator("key_file", mode="before")
    @classmethod
    def _key_file_given(cls, value: object) -> object:
        # An empty path would be the current directory; the key is too important to guess a default for.
        if value == "":
            raise ValueError("is empty: give the key file's path, or leave the variable unset for the default")
        return value

    @field_validator("health_port", mode="before")
    @classmethod
    def _empty_port_is_default(cls, value: object) -> object:
        return None if value == "" else value

    def health_port_for(self, service: str) -> int:
        return self.health_port if self.health_port is not None else DEFAULT_HEALTH_PORTS[service]

    def agent_tls_files(self) -> tuple[Path | None, Path | None, Path | None]:
        return self.agent_ca_file, self.agent_cert_file, self.agent_key_file


def default_log_format() -> Literal["json", "text"]:
    """`text` when stderr is a terminal, else `json` (for log collectors)."""
    stream = sys.stderr
    try:
        return "text" if stream is not None and stream.isatty() else "json"
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return "json"


def _with_valid_port(url: str) -> str:
    """`url` unchanged if its port (when given) is a number in 1 to 65535; else ValueError (the message
    never repeats the URL, which may hold a password)."""
    try:
        port = urlsplit(url).port
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("has port 0; give a port from 1 to 65535")
    return url


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the environment; raise SettingsError with a one-line message. `overrides` (field
    names) take the place of environment variables, and are validated as they would be."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            variable = f"HEALTHGATE_{field.upper()}" if field else "configuration"
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{variable}: {message}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
