"""``calibration.json``: what one deployment's draft tokens cost, per model and load level, as ``measure`` fitted it.

``specdec-sidecar measure`` writes it (with a baseline server to compare against); ``serve --calibration``
reads it, so a verdict can judge acceptance by the measured cost of a draft token instead of a fixed 0.5.
The format, field by field, is in ``docs/measure.md`` ("calibration.json"). A file looks like::

    {
      "schema": "specdec-calibration/2",
      "models": {
        "tiny-target": {
          "method": "ngram",
          "k": 4,
          "vllm_version": "0.32.0",
          "measured_at": "2026-11-25T15:22:00Z",
          "levels": [
            {"concurrency": 1, "draft_cost": 0.002, "draft_cost_low": 0.0, "draft_cost_high": 0.041,
             "break_even": 0.002, "best_k": 3,
             "by_temperature": [
               {"temperature": 0, "draft_cost": 0.001, "draft_cost_low": 0.0, "draft_cost_high": 0.03,
                "break_even": 0.001},
               {"temperature": 1, "draft_cost": 0.4, "draft_cost_low": 0.2, "draft_cost_high": 0.7,
                "break_even": 0.4}
             ]},
            {"concurrency": 4, "draft_cost": 0.087, "draft_cost_low": 0.052, "draft_cost_high": 0.12,
             "break_even": 0.087, "best_k": 1}
          ]
        }
      }
    }

Every field is checked on load and the first wrong one is reported in one line naming it, e.g.
``calibration: models["tiny-target"].levels[1].draft_cost: must be a finite number >= 0, got NaN``: a file
that does not hold exactly what ``measure`` writes must never turn into a silent wrong verdict.

Why the break-even acceptance is ``c`` itself (clamped to 0..1): see the break-even model in
``sidecar/decision.py``.

``by_temperature`` (schema 2, optional) holds ``c`` fitted from each measured temperature's cell alone. One
``c`` per level fits the mix ``measure`` ran; but what speculation costs a pass also depends on sampling (on
vLLM 0.32's CPU build a sampled request on the speculative server is slower per pass even when nothing is
drafted), so a temperature bucket is judged by the costs measured at the temperatures it holds, and by the
level's ``c`` where none was measured. Schema 1 files (no ``by_temperature``) are still read.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

SCHEMA = "specdec-calibration/2"
SCHEMAS = ("specdec-calibration/1", SCHEMA)  # what this sidecar reads; it writes SCHEMA

_FILE_KEYS = {"schema", "models"}
_MODEL_KEYS = {"method", "k", "vllm_version", "measured_at", "levels"}
_LEVEL_KEYS_1 = {"concurrency", "draft_cost", "draft_cost_low", "draft_cost_high", "break_even", "best_k"}
_LEVEL_KEYS = _LEVEL_KEYS_1 | {"by_temperature"}
_TEMPERATURE_KEYS = {"temperature", "draft_cost", "draft_cost_low", "draft_cost_high", "break_even"}
# break_even is derived from draft_cost; a file whose two disagree by more than rounding was edited or corrupted.
_BREAK_EVEN_TOLERANCE = 1e-9


class CalibrationError(ValueError):
    """A calibration that cannot be used; ``str()`` is one line naming the field (or the file) at fault."""


def break_even_of(draft_cost: float) -> float:
    """The acceptance rate at which the modelled speed-up is 1: ``c``, held to 0..1 (``c >= 1``: no
    acceptance pays, so 1)."""
    return min(1.0, max(0.0, draft_cost))


@dataclass(frozen=True, slots=True)
class TemperatureCost:
    """c fitted from one measured temperature's cell at one level, with its interval."""

    temperature: float
    draft_cost: float
    draft_cost_low: float
    draft_cost_high: float
    break_even: float


@dataclass(frozen=True, slots=True)
class Level:
    """One load level: what ``measure`` fitted at one client concurrency (standing in for vLLM's batch size)."""

    concurrency: float
    draft_cost: float  # c: target forward passes one draft token costs, >= 0
    draft_cost_low: float  # its 95% bootstrap interval over requests
    draft_cost_high: float
    break_even: float  # acceptance rate at which the modelled speed-up is 1: min(1, max(0, c))
    best_k: int  # the draft length with the best modelled speed-up for the measured mix; 0 = speculation off
    by_temperature: tuple[TemperatureCost, ...] = ()  # sorted by temperature, each once

    def draft_cost_for(self, selects: Callable[[float], bool] | None = None) -> float:
        """c for the temperatures *selects* picks: the mean of their own costs where this level measured any,
        the level's c otherwise (and without *selects*)."""
        if selects is not None:
            costs = [t.draft_cost for t in self.by_temperature if selects(t.temperature)]
            if costs:
                return sum(costs) / len(costs)
        return self.draft_cost


@dataclass(frozen=True, slots=True)
class ModelCalibration:
    """One served model's calibration. ``levels`` are sorted by concurrency, at least one."""

    model: str
    method: str
    k: int
    levels: tuple[Level, ...]
    vllm_version: str | None
    measured_at: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))

    def draft_cost_at(self, load: float, selects: Callable[[float], bool] | None = None) -> float:
        """c at *load* concurrent requests: linear between the calibrated levels, the end levels' c beyond them.
        With *selects* (a temperature bucket's test), each level's c for the measured temperatures it picks
        (``Level.draft_cost_for``)."""
        if math.isnan(load):
            raise ValueError("load must be a number, got NaN")
        levels = self.levels
        if load <= levels[0].concurrency:
            return levels[0].draft_cost_for(selects)
        if load >= levels[-1].concurrency:
            return levels[-1].draft_cost_for(selects)
        upper = bisect.bisect_right([lv.concurrency for lv in levels], load)
        low, high = levels[upper - 1], levels[upper]
        share = (load - low.concurrency) / (high.concurrency - low.concurrency)
        low_cost, high_cost = low.draft_cost_for(selects), high.draft_cost_for(selects)
        return low_cost + share * (high_cost - low_cost)

    def measured_temperatures(self) -> tuple[float, ...]:
        """Every temperature some level has a cost of its own for, sorted."""
        return tuple(sorted({t.temperature for lv in self.levels for t in lv.by_temperature}))

    def break_even_at(self, load: float) -> float:
        """The break-even acceptance rate at *load*: the interpolated c, held to 0..1."""
        return break_even_of(self.draft_cost_at(load))

    def best_k_at(self, load: float) -> int:
        """The best k of the highest level at or below *load* (the first level's below it), as vLLM's
        ``num_speculative_tokens_per_batch_size`` ranges run from one measured concurrency up to the next."""
        if math.isnan(load):
            raise ValueError("load must be a number, got NaN")
        index = bisect.bisect_right([lv.concurrency for lv in self.levels], load) - 1
        return self.levels[max(0, index)].best_k


@dataclass(frozen=True, slots=True)
class Calibration:
    """Every calibrated model by its served name (vLLM's ``model_name`` label); ``source_path`` = the file read."""

    models: Mapping[str, ModelCalibration]
    source_path: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))


# --- reading ---------------------------------------------------------------------------------------------

def _show(value: object) -> str:
    """A value as the file spells it (NaN, Infinity, "text", null), short."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, path: str, reason: str, value: object = ...) -> CalibrationError:
    got = "" if value is ... else f", got {_show(value)}"
    return CalibrationError(f"{where}: {path}: {reason}{got}" if path else f"{where}: {reason}{got}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(where: str, path: str, value: object, minimum: float | None = 0.0, strict: bool = False) -> float:
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    if value is ...:
        raise _fail(where, path, f"missing (a finite number{bound})")
    if (not _is_number(value) or not math.isfinite(value)  # type: ignore[arg-type]
            or (minimum is not None and (value <= minimum if strict else value < minimum))):  # type: ignore[operator]
        raise _fail(where, path, f"must be a finite number{bound}", value)
    return float(value)  # type: ignore[arg-type]


def _integer(where: str, path: str, value: object, minimum: int, maximum: int | None = None,
             maximum_name: str = "") -> int:
    span = f"from {minimum} to {maximum_name or maximum}" if maximum is not None else f">= {minimum}"
    if value is ...:
        raise _fail(where, path, f"missing (an integer {span})")
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (
            maximum is not None and value > maximum):
        raise _fail(where, path, f"must be an integer {span}", value)
    return value


def _object(where: str, path: str, value: object, allowed: set[str], what: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, path, f"must be an object ({what})", value)
    if unknown := sorted(set(value) - allowed):
        name = f"{path}.{unknown[0]}" if path else unknown[0]
        raise _fail(where, name, f"unknown field (expected {', '.join(sorted(allowed))})")
    return value


def _cost(where: str, path: str, data: dict) -> tuple[float, float, float, float]:
    """(draft_cost, draft_cost_low, draft_cost_high, break_even), checked against each other."""
    cost = _finite(where, f"{path}.draft_cost", data.get("draft_cost", ...))
    low = _finite(where, f"{path}.draft_cost_low", data.get("draft_cost_low", ...))
    high = _finite(where, f"{path}.draft_cost_high", data.get("draft_cost_high", ...))
    if low > cost:
        raise _fail(where, f"{path}.draft_cost_low", f"must be <= draft_cost ({cost:g}): the interval must "
                    "contain the fitted cost", low)
    if high < cost:
        raise _fail(where, f"{path}.draft_cost_high", f"must be >= draft_cost ({cost:g}): the interval must "
                    "contain the fitted cost", high)
    break_even = _finite(where, f"{path}.break_even", data.get("break_even", ...))
    if abs(break_even - break_even_of(cost)) > _BREAK_EVEN_TOLERANCE:
        raise _fail(where, f"{path}.break_even", f"must be draft_cost held to 0..1 ({break_even_of(cost):g})",
                    break_even)
    return cost, low, high, break_even


def _by_temperature(where: str, path: str, value: object) -> tuple[TemperatureCost, ...]:
    if not isinstance(value, list):
        raise _fail(where, path, "must be a list of per-temperature costs", value)
    out: list[TemperatureCost] = []
    for index, raw in enumerate(value):
        at = f"{path}[{index}]"
        data = _object(where, at, raw, _TEMPERATURE_KEYS, "one temperature's cost")
        temperature = _finite(where, f"{at}.temperature", data.get("temperature", ...))
        if out and temperature <= out[-1].temperature:
            raise _fail(where, f"{at}.temperature", f"must be above by_temperature[{index - 1}].temperature "
                        f"({out[-1].temperature:g}): sorted, each once", temperature)
        out.append(TemperatureCost(temperature, *_cost(where, at, data)))
    return tuple(out)


def _level(where: str, path: str, data: object, k: int, keys: set[str]) -> Level:
    data = _object(where, path, data, keys, "one load level")
    concurrency = _finite(where, f"{path}.concurrency", data.get("concurrency", ...), 0.0, strict=True)
    cost, low, high, break_even = _cost(where, path, data)
    best_k = _integer(where, f"{path}.best_k", data.get("best_k", ...), 0, k, f"k ({k})")
    by_temperature = ()
    if "by_temperature" in data:
        by_temperature = _by_temperature(where, f"{path}.by_temperature", data["by_temperature"])
    return Level(concurrency, cost, low, high, break_even, best_k, by_temperature)


def _measured_at(where: str, path: str, value: object) -> str:
    if value is ...:
        raise _fail(where, path, "missing (an ISO 8601 time with its UTC offset, e.g. 2026-11-25T15:22:00Z)")
    try:
        if not isinstance(value, str):
            raise ValueError
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _fail(where, path, "must be an ISO 8601 time such as 2026-11-25T15:22:00Z", value) from None
    if moment.utcoffset() is None:
        raise _fail(where, path, "must carry its UTC offset (e.g. a trailing Z)", value)
    return value


def _model(where: str, name: str, data: object, level_keys: set[str]) -> ModelCalibration:
    path = f"models[{json.dumps(name)}]"
    data = _object(where, path, data, _MODEL_KEYS, "one model's calibration")
    method = data.get("method", ...)
    if method is ...:
        raise _fail(where, f"{path}.method", "missing (e.g. ngram, draft_model, eagle, or unknown)")
    if not isinstance(method, str) or not method.strip():
        raise _fail(where, f"{path}.method", "must be a non-empty string (e.g. ngram, draft_model, eagle)", method)
    k = _integer(where, f"{path}.k", data.get("k", ...), 1)
    version = data.get("vllm_version", ...)
    if version is ...:
        raise _fail(where, f"{path}.vllm_version", "missing (a string, or null when unknown)")
    if version is not None and (not isinstance(version, str) or not version.strip()):
        raise _fail(where, f"{path}.vllm_version", "must be a non-empty string or null", version)
    measured_at = _measured_at(where, f"{path}.measured_at", data.get("measured_at", ...))
    raw_levels = data.get("levels", ...)
    if raw_levels is ...:
        raise _fail(where, f"{path}.levels", "missing (a list of load levels, at least one)")
    if not isinstance(raw_levels, list) or not raw_levels:
        raise _fail(where, f"{path}.levels", "must be a list of at least one load level", raw_levels)
    levels: list[Level] = []
    for index, raw in enumerate(raw_levels):
        level = _level(where, f"{path}.levels[{index}]", raw, k, level_keys)
        if levels and level.concurrency <= levels[-1].concurrency:
            raise _fail(where, f"{path}.levels[{index}].concurrency",
                        f"must be above levels[{index - 1}].concurrency ({levels[-1].concurrency:g}): levels are "
                        "sorted by concurrency, each once", raw["concurrency"])
        levels.append(level)
    return ModelCalibration(name, method, k, tuple(levels), version, measured_at)


def parse(data: object, where: str = "calibration") -> Calibration:
    """A decoded ``calibration.json`` -> ``Calibration``; raises ``CalibrationError`` naming the first bad field."""
    data = _object(where, "", data, _FILE_KEYS, f"a {SCHEMA} calibration")
    schema = data.get("schema", ...)
    if schema is ...:
        raise _fail(where, "schema", f"missing (expected {json.dumps(SCHEMA)})")
    if schema not in SCHEMAS:
        raise _fail(where, "schema", f"must be one of {', '.join(json.dumps(s) for s in SCHEMAS)} (the versions "
                    "this sidecar reads)", schema)
    models = data.get("models", ...)
    if models is ...:
        raise _fail(where, "models", "missing (an object of calibrations by model name)")
    if not isinstance(models, dict) or not models:
        raise _fail(where, "models", "must be an object naming at least one model", models)
    parsed: dict[str, ModelCalibration] = {}
    for name, entry in models.items():
        if not isinstance(name, str) or not name.strip():
            raise _fail(where, f"models[{json.dumps(name)}]", "a model name must not be empty")
        parsed[name] = _model(where, name, entry, _LEVEL_KEYS if schema == SCHEMA else _LEVEL_KEYS_1)
    return Calibration(parsed)


def load(path: str | os.PathLike) -> Calibration:
    """Read and check a calibration file; every failure (unreadable, not JSON, a bad field) is one line."""
    where = f"calibration {os.fspath(path)}"
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as error:
        raise CalibrationError(f"{where}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise CalibrationError(f"{where}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CalibrationError(f"{where}: not JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    calibration = parse(data, where)
    return Calibration(calibration.models, os.fspath(path))


# --- writing ---------------------------------------------------------------------------------------------

def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def to_json(cal: Calibration) -> dict:
    return {
        "schema": SCHEMA,
        "models": {
            name: {
                "method": m.method,
                "k": m.k,
                "vllm_version": m.vllm_version,
                "measured_at": m.measured_at,
                "levels": [
                    {"concurrency": _number(lv.concurrency), "draft_cost": lv.draft_cost,
                     "draft_cost_low": lv.draft_cost_low, "draft_cost_high": lv.draft_cost_high,
                     "break_even": lv.break_even, "best_k": lv.best_k,
                     **({"by_temperature": [
                         {"temperature": _number(t.temperature), "draft_cost": t.draft_cost,
                          "draft_cost_low": t.draft_cost_low, "draft_cost_high": t.draft_cost_high,
                          "break_even": t.break_even} for t in lv.by_temperature]} if lv.by_temperature else {})}
                    for lv in m.levels
                ],
            }
            for name, m in cal.models.items()
        },
    }


def dumps(cal: Calibration) -> str:
    """The file's text. Checked as ``load`` would check it, so what is written can always be read back."""
    data = to_json(cal)
    text = json.dumps(data, indent=2, allow_nan=True) + "\n"
    parse(json.loads(text))  # raises CalibrationError before a bad file is written
    return text
