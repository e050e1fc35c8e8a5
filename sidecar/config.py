"""Settings: one object built at the entry point from CLI flags and ``SPECDEC_*`` env vars.

A flag given on the command line wins over the environment; the environment wins over the default.
Every field here appears in the README's settings table.

Every command declares, validates and rejects its settings the same way, with the helpers at the end of this
module: a pydantic model whose fields are the flags (``add_flags``), built from what was given
(``settings_from``), a bad value reported as one ``SettingsError`` line naming the flag (and the env var for
``serve``), and the exit status named once in ``ExitCode``.
"""

from __future__ import annotations

import argparse
import enum
import importlib.util
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args

from pydantic import BaseModel, Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sidecar.buckets import DEFAULT_EDGES, TemperatureBuckets, parse_edges
from sidecar.decision import DEFAULT_BAND, DEFAULT_BREAK_EVEN, DEFAULT_NEAR_UPPER

M = TypeVar("M", bound=BaseModel)

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


def http_url(value: str) -> str:
    """An http(s) base URL without its trailing slash; ValueError (the reason) otherwise."""
    value = value.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("not an http(s) URL")
    return value


def comma_list(value: object) -> object:
    """``"1, 4,16"`` -> ``["1", "4", "16"]`` for a list setting given as text; anything else unchanged."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything ``specdec-sidecar serve`` can be told. Field names map to ``--flag-name`` and
    ``SPECDEC_FIELD_NAME``."""

    model_config = SettingsConfigDict(env_prefix="SPECDEC_", extra="forbid", validate_default=True)
    _api_key: str | None = PrivateAttr(None)

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
    break_even: float = Field(
        DEFAULT_BREAK_EVEN, gt=0, lt=1,
        description="Uncalibrated models: acceptance below this is net-negative, verdict `disable`.",
    )
    near_break_even_upper: float = Field(
        DEFAULT_NEAR_UPPER, gt=0, le=1,
        description="Uncalibrated models: acceptance from --break-even up to this is `near_break_even`; at or above, `use`.",
    )
    calibration: str | None = Field(
        None,
        description="calibration.json written by `specdec-sidecar measure`: calibrated models are judged by their "
        "modelled speed-up at the current load; re-read when it changes (unset = --break-even thresholds).",
    )
    band: float = Field(
        DEFAULT_BAND, gt=0, lt=1,
        description="Calibrated models: a modelled speed-up within 1 +- band is `near_break_even`, below `disable`.",
    )
    speculative: Literal["auto", "true", "false"] = Field(
        "auto",
        description="Whether this vLLM drafts (its arm, for the baseline comparison): auto (detected from whether "
        "vLLM exports its spec-decode families), true or false.",
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
    max_buffered_bytes: int = Field(
        64 * 1024 * 1024, ge=0,
        description="Most response bytes the proxy holds for clients that stopped reading, all together; past it "
        "the connection holding the most is closed (0 = no cap).",
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
        return http_url(value)

    @field_validator("temperature_edges", mode="before")
    @classmethod
    def _edges(cls, value: object) -> tuple[float, ...]:
        edges = parse_edges(value)  # type: ignore[arg-type]
        TemperatureBuckets(edges)  # raises ValueError with the reason
        return edges

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: object) -> object:
        return comma_list(value)

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

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, value: str | None) -> str | None:
        if value is not None:
            from sidecar.calibration import CalibrationError, load

            try:
                load(value)
            except CalibrationError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("windows", mode="before")
    @classmethod
    def _windows(cls, value: object) -> list[float]:
        items = comma_list(value)
        if not isinstance(items, list) or not items:
            raise ValueError("give at least one window, e.g. 1m,5m,15m")
        seconds = sorted({parse_duration(item) for item in items})
        return seconds

    @field_validator("log_format", "log_level", "event_loop", "speculative", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("event_loop")
    @classmethod
    def _loop_installed(cls, value: str) -> str:
        if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("uvloop is not installed (pip install uvloop)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.scrape_timeout is None:  # as Prometheus does: the default timeout never exceeds the interval
            self.scrape_timeout = min(DEFAULT_SCRAPE_TIMEOUT, self.scrape_interval)
        if self.upstream_api_key is not None and self.upstream_api_key_file is not None:
            raise ValueError("upstream_api_key and upstream_api_key_file are both set; give one")
        if self.upstream_api_key is not None:
            self._api_key = self.upstream_api_key.get_secret_value()
        elif self.upstream_api_key_file is not None:  # read once, here (_key_file checked it is readable)
            self._api_key = Path(self.upstream_api_key_file).read_text().strip()
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
        """The upstream API key from either setting (the file is read once, when the settings are built)."""
        return self._api_key

    @property
    def upstream_for_logs(self) -> str:
        """The upstream URL without credentials (``http://user:pass@host`` logs as ``http://***@host``)."""
        return redact_url(self.upstream)

    @property
    def temperature_buckets(self) -> TemperatureBuckets:
        return TemperatureBuckets(self.temperature_edges, self.default_temperature)


class ExitCode(enum.IntEnum):
    """The exit status of every command: one name per meaning."""

    OK = 0
    GATE_FAILED = 1  # measure --fail-if-hurts-at: speculation hurts at a gated temperature
    BAD_SETTING = 2  # a flag, env var or a file one names is wrong: one line on stderr naming it
    UNMEASURABLE = 3  # measure: a server could not be measured (unreachable, or a whole cell failed)
    INTERRUPTED = 130  # measure stopped by Ctrl-C (128 + SIGINT), as shells report it


class SettingsError(Exception):
    """A setting is wrong; ``str()`` is one line naming it (``invalid setting --flag[ / ENV]: why``)."""

    @classmethod
    def invalid(cls, flag: str, reason: str) -> SettingsError:
        """For a setting found wrong after validation, where the failure happens (e.g. a file it names)."""
        return cls(f"invalid setting {flag}: {reason}")


def flag_of(field: str, info: FieldInfo | None = None) -> str:
    """``near_break_even_upper`` -> ``--near-break-even-upper`` (a field's alias, when it has one, is its flag)."""
    return "--" + ((info.alias if info is not None and info.alias else None) or field).replace("_", "-")


def _is_secret(info: FieldInfo | None) -> bool:
    annotation = info.annotation if info is not None else None
    return annotation is SecretStr or SecretStr in get_args(annotation)


def describe_validation_error(
    error: ValidationError, model: type[BaseModel] | None = None, env_prefix: str | None = "SPECDEC_"
) -> str:
    """One line naming the first bad setting as the user spelled it: the flag, and the env var when the
    command reads one. Secrets are never echoed, URLs lose their user-info."""
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "__root__"]
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if not loc:
        return f"invalid settings: {message}"
    if first.get("type") == "missing":
        message = "required, not given"
    field = loc[0]
    fields = model.model_fields if model is not None else {}
    info = fields.get(field) or next((i for i in fields.values() if i.alias == field), None)
    if first.get("type") == "extra_forbidden":
        return f"unknown setting {field!r}"
    name = flag_of(field) + (f" / {env_prefix}{field.upper()}" if env_prefix else "")
    given = first.get("input")
    if _is_secret(info) or field == "upstream_api_key":
        given = None  # a secret is never echoed
    elif isinstance(given, str) and "://" in given:
        given = redact_url(given)
    shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
    return f"invalid setting {name}{shown}: {message}"


# --- one way for every command: flags declared by a settings model, validated by it, rejected in one line ---

def _shown(default: object) -> str:
    if default is None:
        return "unset"
    if isinstance(default, list | tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) or "unset"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def add_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    env_prefix: str | None = None,
    shown: Mapping[str, str] | None = None,
) -> None:
    """One flag per field of *model*: ``--field-name`` (or its alias), help = the field's description.

    Every flag defaults to None ("not given"), so the model's default (and, for ``serve``, the env var)
    applies; values reach the model as text and the model alone validates them. A bool field is a switch.
    ``shown`` overrides how a default is displayed in ``--help``.
    """
    for name, info in model.model_fields.items():
        flag = flag_of(name, info)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        if info.is_required():
            where = "required"
        else:
            where = f"default {(shown or {}).get(name) or _shown(default)}"
        if env_prefix:
            where = f"env {env_prefix}{name.upper()}, {where}"
        text = f"{info.description} [{where}]"
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=info.description)
            continue
        parser.add_argument(flag, dest=name, default=None, help=text,
                            metavar=str(extra.get("metavar") or name.split("_")[-1].upper()))


def settings_from(args: argparse.Namespace | Mapping[str, object], model: type[M], env_prefix: str | None = None) -> M:
    """*model* built from the flags given (None = not given); a bad value raises ``SettingsError``."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    given = {(info.alias or name): values[name] for name, info in model.model_fields.items()
             if values.get(name) is not None}
    try:
        return model(**given)
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, model, env_prefix)) from None


def build_settings(**flags: object) -> Settings:
    """``serve``'s Settings from explicitly given flags (None = not given) over env vars over defaults."""
    return settings_from(flags, Settings, "SPECDEC_")
