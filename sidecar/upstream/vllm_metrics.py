"""What the sidecar reads from a vLLM /metrics page, as an immutable snapshot per (model, engine).

Supported: vLLM V1 engine names (0.8 through 0.32 checked against 0.32 captures) and the older V0 names
(``vllm:gpu_cache_usage_perc``, ``vllm:spec_decode_draft_acceptance_rate``, ``..._efficiency``,
``..._num_emitted_tokens_total``). ``engine`` is absent on V0; it is then read as ``"0"``.
``vllm:cache_config_info`` carries only ``engine``; its facts are attached to every model on that engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from sidecar.upstream.exposition import Exposition, parse

# Sample name -> EngineSample field for plain (non-positional) values.
COUNTERS = {
    "vllm:spec_decode_num_drafts_total": "drafts",
    "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens_total": "accepted_tokens",
    "vllm:spec_decode_num_emitted_tokens_total": "emitted_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:num_preemptions_total": "preemptions",
}
GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage_v0",
    "vllm:spec_decode_draft_acceptance_rate": "v0_acceptance_rate",
    "vllm:spec_decode_efficiency": "v0_efficiency",
}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
CACHE_CONFIG = "vllm:cache_config_info"
CACHE_FACTS = {
    "kv_cache_size_tokens": "kv_capacity_tokens",
    "kv_cache_memory_bytes": "kv_capacity_bytes",
    "num_gpu_blocks": "num_blocks",
    "block_size": "block_size",
}
# Ray Serve's exporter prefixes every vLLM name with ``ray_``; such pages are read under vLLM's own names.
RAY_PREFIX = "ray_"
_NAMES = [*COUNTERS, *GAUGES, PER_POSITION, CACHE_CONFIG]
WANTED = frozenset([*_NAMES, *(RAY_PREFIX + name for name in _NAMES)])
DEFAULT_ENGINE = "0"
RATIO_GAUGES = frozenset({"kv_usage", "kv_usage_v0"})  # 0..1 by definition: anything else is a broken reading


@dataclass(frozen=True, slots=True)
class EngineSample:
    """Raw values for one (model, engine) at one scrape. ``None`` = not exported by this vLLM."""

    drafts: float | None = None
    draft_tokens: float | None = None
    accepted_tokens: float | None = None
    emitted_tokens: float | None = None
    generation_tokens: float | None = None
    preemptions: float | None = None
    accepted_per_position: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    kv_usage_v0: float | None = None
    v0_acceptance_rate: float | None = None
    v0_efficiency: float | None = None
    kv_capacity_tokens: float | None = None
    kv_capacity_bytes: float | None = None
    num_blocks: float | None = None
    block_size: float | None = None

    @property
    def speculates(self) -> bool:
        """Whether this engine exports any spec-decode family: vLLM does only when speculation is configured
        (a server without ``--speculative-config`` exports none of them, not even at 0)."""
        return (any(v is not None for v in (self.drafts, self.draft_tokens, self.accepted_tokens,
                                            self.emitted_tokens, self.v0_acceptance_rate, self.v0_efficiency))
                or bool(self.accepted_per_position))

    @property
    def kv_usage_ratio(self) -> float | None:
        """KV cache usage 0..1 from whichever name this vLLM exports (V1 first)."""
        return self.kv_usage if self.kv_usage is not None else self.kv_usage_v0

    def counter(self, name: str) -> float | None:
        return getattr(self, name)


SeriesKey = tuple[str, str]  # (model, engine)


@dataclass(frozen=True, slots=True)
class VllmSnapshot:
    """Everything read from one successful scrape, keyed by (model, engine)."""

    engines: Mapping[SeriesKey, EngineSample]
    invalid_lines: int = 0

    @property
    def models(self) -> list[str]:
        return sorted({model for model, _ in self.engines})

    def speculating(self) -> dict[str, bool]:
        """Per model: whether any of its engines exports vLLM's spec-decode families (detected speculation)."""
        out: dict[str, bool] = {}
        for (model, _), sample in self.engines.items():
            out[model] = out.get(model, False) or sample.speculates
        return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def snapshot_from_exposition(exposition: Exposition) -> VllmSnapshot:
    """One snapshot per (model, engine) from the wanted samples.

    Several series of one name may map to one (model, engine) (labels the sidecar does not split on):
    counters are added up (each process counts its own share); gauges are added up too, except those
    labelled ``pid`` (one per API-server process, each reporting the same engine), of which the highest is
    kept. A family with HELP/TYPE but no samples leaves its field absent (``None``), never 0.
    """
    values: dict[SeriesKey, dict[str, float]] = {}
    per_pid: dict[tuple[SeriesKey, str], float] = {}
    positions: dict[SeriesKey, dict[int, float]] = {}
    cache_facts: dict[str, dict[str, float]] = {}
    invalid = exposition.invalid_lines

    for sample in exposition.samples:
        name = sample.name.removeprefix(RAY_PREFIX)
        engine = sample.label("engine", DEFAULT_ENGINE) or DEFAULT_ENGINE
        if name == CACHE_CONFIG:
            facts = cache_facts.setdefault(engine, {})
            for label, attr in CACHE_FACTS.items():
                number = _number(sample.label(label))
                if number is not None:
                    facts[attr] = number
            continue
        value = _finite(sample.value)
        if value is None:
            continue
        model = sample.label("model_name", "")
        key = (model, engine)
        if name == PER_POSITION:
            try:
                position = int(sample.label("position"))
            except ValueError:
                continue
            per_pos = positions.setdefault(key, {})
            per_pos[position] = per_pos.get(position, 0.0) + value
            continue
        counter = COUNTERS.get(name)
        attr = counter or GAUGES[name]
        if attr in RATIO_GAUGES and not 0.0 <= value <= 1.0:
            invalid += 1  # e.g. a negative KV usage seen on a buggy build: dropped, not passed on
            continue
        if counter is None and sample.label("pid"):
            slot = (key, attr)
            per_pid[slot] = max(per_pid.get(slot, value), value)
            continue
        fields = values.setdefault(key, {})
        fields[attr] = fields.get(attr, 0.0) + value
    for (key, attr), value in per_pid.items():
        fields = values.setdefault(key, {})
        fields[attr] = fields.get(attr, 0.0) + value

    # Series added up past the largest float (1e308 twice) are no reading at all: dropped and counted.
    for table in (*values.values(), *positions.values()):
        for name in [k for k, v in table.items() if not math.isfinite(v)]:
            del table[name]
            invalid += 1

    engines: dict[SeriesKey, EngineSample] = {}
    for key in sorted(set(values) | set(positions)):
        fields: dict[str, object] = dict(values.get(key, {}))
        fields.update(cache_facts.get(key[1], {}))
        per_pos = positions.get(key)
        if per_pos:
            fields["accepted_per_position"] = MappingProxyType(dict(sorted(per_pos.items())))
        engines[key] = EngineSample(**fields)  # type: ignore[arg-type]
    return VllmSnapshot(engines=MappingProxyType(engines), invalid_lines=invalid)


def read_vllm_metrics(text: str) -> VllmSnapshot:
    """Parse a vLLM /metrics page into a snapshot."""
    return snapshot_from_exposition(parse(text, WANTED))
