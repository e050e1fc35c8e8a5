"""Settings: one object built at the entry point from CLI flags and ``SPECDEC_*`` env vars.

A flag given on the command line wins over the environment; the environment wins over the default.
Every field here appears in the README's settings table.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sidecar.buckets import DEFAULT_EDGES, TemperatureBuckets, parse_edges

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: str | float | int) -> float:
    """``"90s"``, ``"5m"``, ``"1h"``, ``"250ms"`` or a bare number of seconds -> seconds (float)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5s, 1m or 0.5")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 5s, 1m, 1h)")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} must be a positive duration")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest Prometheus-style label (``300`` -> ``"5m"``, ``90`` -> ``"90s"``)."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{int(round(seconds * 1000))}ms"


# Settings given as durations ("5s", "1m"): validated by parse_duration, shown by format_duration.
DURATION_FIELDS = (
    "scrape_interval", "scrape_timeout", "windows", "verdict_window", "upstream_connect_timeout", "upstream_keepalive",
)  # fmt: skip


DEFAULT_SCRAPE_TIMEOUT = 3.0


def redact_url(url: str) -> str:
    """*url* with any user-info replaced by ``***``: credentials never reach a log line."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}://{authority}{slash}{path}"


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything ``specdec-sidecar serve`` can be told. Field names map to ``--flag-name`` and
    ``SPECDEC_FIELD_NAME``."""

    model_config = SettingsConfigDict(env_prefix="SPECDEC_", extra="forbid", validate_default=True)

    upstream: str = Field(
        "http://127.0.0.1:8000",
        description="Base URL of the vLLM server (its /metrics is scraped; the proxy forwards here).",
    )
    metrics_host: str = Field("0.0.0.0", description="Address the sidecar's /metrics, /healthz, /readyz bind to.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Port for /metrics, /healthz, /readyz (0 = any free port).")
    scrape_interval: float = Field(5.0, description="How often the sidecar polls vLLM /metrics (e.g. 5s).")
    scrape_timeout: float | None = Field(
        None, description="Timeout of one poll of vLLM /metrics; at most the interval (unset = min(3s, interval))."
    )
    windows: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [60.0, 300.0, 900.0],
        description="Derivation windows, comma separated (e.g. 1m,5m,15m).",
    )
    verdict_window: float = Field(300.0, description="Window the verdict and the compatibility gauge use; one of --windows.")
    break_even: float = Field(0.5, gt=0, lt=1, description="Acceptance below this is net-negative: verdict `disable`.")
    near_break_even_upper: float = Field(
        0.65, gt=0, le=1, description="Acceptance from --break-even up to this is `near_break_even`; at or above, `use`."
    )
    min_drafts: int = Field(
        100, ge=1, description="Fewest draft steps in a window before acceptance is exported and a verdict given."
    )
    proxy_port: int | None = Field(
        None, ge=0, le=65535, description="Port of the request-path proxy to vLLM (unset = no proxy; 0 = any free port)."
    )
    proxy_host: str = Field("0.0.0.0", description="Address the proxy binds to.")
    temperature_edges: Annotated[tuple[float, ...], NoDecode] = Field(
        DEFAULT_EDGES,
        description="Upper edges of the temperature buckets above 0, comma separated (0 is always its own bucket).",
    )
    default_temperature: float | None = Field(
        None, ge=0, description="Temperature vLLM applies when a request omits it (unset = bucket `default`)."
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Allowed model label values, comma separated (unset = what vLLM's /v1/models lists).",
    )
    max_observed_body: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request or non-streamed response body (bytes) the tap parses."
    )
    upstream_connect_timeout: float = Field(5.0, description="Timeout to connect to vLLM for a proxied request.")
    upstream_api_key: SecretStr | None = Field(
        None,
        description="vLLM's --api-key, sent as a bearer token on the sidecar's own requests (/v1/models, /metrics); "
        "prefer the env var or the file. Proxied requests keep the client's own Authorization.",
    )
    upstream_api_key_file: str | None = Field(
        None, description="File holding vLLM's API key (e.g. a mounted Secret); read once at start."
    )
    upstream_keepalive: float = Field(
        4.0, description="Idle upstream connections of the proxy are closed after this (below vLLM's 5 s)."
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="Event loop: auto (uvloop when installed, as it is on Linux; else asyncio's own), "
        "asyncio or uvloop."
    )
    log_format: Literal["json", "console"] = Field("json", description="json (one object per line) or console.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("not an http(s) URL")
        return value

    @field_validator("temperature_edges", mode="before")
    @classmethod
    def _edges(cls, value: object) -> tuple[float, ...]:
        edges = parse_edges(value)  # type: ignore[arg-type]
        TemperatureBuckets(edges)  # raises ValueError with the reason
        return edges

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: object) -> object:
        return _split_list(value)

    @field_validator(*(f for f in DURATION_FIELDS if f != "windows"), mode="before")
    @classmethod
    def _duration(cls, value: object) -> float | None:
        if value is None:
            return None
        return parse_duration(value)  # type: ignore[arg-type]

    @field_validator("upstream_api_key_file")
    @classmethod
    def _key_file(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            key = Path(value).read_text().strip()
        except OSError as error:
            raise ValueError(f"cannot read {value!r}: {error.strerror}") from None
        if not key:
            raise ValueError(f"{value!r} is empty")
        return value

    @field_validator("windows", mode="before")
    @classmethod
    def _windows(cls, value: object) -> list[float]:
        items = _split_list(value)
        if not isinstance(items, list) or not items:
            raise ValueError("give at least one window, e.g. 1m,5m,15m")
        seconds = sorted({parse_duration(item) for item in items})
        return seconds

    @field_validator("log_format", "log_level", "event_loop", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.scrape_timeout is None:  # as Prometheus does: the default timeout never exceeds the interval
            self.scrape_timeout = min(DEFAULT_SCRAPE_TIMEOUT, self.scrape_interval)
        if self.upstream_api_key is not None and self.upstream_api_key_file is not None:
            raise ValueError("upstream_api_key and upstream_api_key_file are both set; give one")
        if self.scrape_timeout > self.scrape_interval:
            raise ValueError(
                f"scrape_timeout ({format_duration(self.scrape_timeout)}) exceeds scrape_interval "
                f"({format_duration(self.scrape_interval)})"
            )
        if self.near_break_even_upper <= self.break_even:
            raise ValueError(
                f"near_break_even_upper ({self.near_break_even_upper}) must be above break_even ({self.break_even})"
            )
        if self.verdict_window not in self.windows:
            raise ValueError(
                f"verdict_window ({format_duration(self.verdict_window)}) is not one of windows "
                f"({','.join(format_duration(w) for w in self.windows)})"
            )
        for window in self.windows:
            if window < 2 * self.scrape_interval:
                raise ValueError(
                    f"windows: {format_duration(window)} is shorter than two scrape intervals "
                    f"({format_duration(2 * self.scrape_interval)})"
                )
        return self

    @property
    def api_key(self) -> str | None:
        """The upstream API key from either setting (the file is read once, at start)."""
        if self.upstream_api_key is not None:
            return self.upstream_api_key.get_secret_value()
        if self.upstream_api_key_file is not None:
            return Path(self.upstream_api_key_file).read_text().strip()
        return None

    @property
    def upstream_for_logs(self) -> str:
        """The upstream URL without credentials (``http://user:pass@host`` logs as ``http://***@host``)."""
        return redact_url(self.upstream)

    @property
    def temperature_buckets(self) -> TemperatureBuckets:
        return TemperatureBuckets(self.temperature_edges, self.default_temperature)


class SettingsError(Exception):
    """A setting is wrong; ``str()`` is one line naming it."""


def describe_validation_error(error: ValidationError) -> str:
    """One line naming the first bad setting, as the user spelled it (flag and env var)."""
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "__root__"]
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if loc:
        field = loc[0]
        flag = "--" + field.replace("_", "-")
        env = "SPECDEC_" + field.upper()
        given = first.get("input")
        if field == "upstream_api_key":
            given = None  # a secret is never echoed
        elif field == "upstream" and isinstance(given, str):
            given = redact_url(given)
        shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
        if first.get("type") == "extra_forbidden":
            return f"unknown setting {field!r}"
        return f"invalid setting {flag} / {env}{shown}: {message}"
    return f"invalid settings: {message}"


def build_settings(**flags: object) -> Settings:
    """Settings from explicitly given flags (None = not given) over env vars over defaults."""
    given = {key: value for key, value in flags.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None
