"""vLLM names -> snapshot: V1 captures, data-parallel engines, several models, V0 names."""

import re

import pytest

from fakes import V0_PAGE, fixture_text
from sidecar.upstream.vllm_metrics import read_vllm_metrics


def test_real_v1_capture():
    snap = read_vllm_metrics(fixture_text("vllm-0.32-draft-t3.prom"))
    assert list(snap.engines) == [("tiny-target", "0")]
    s = snap.engines[("tiny-target", "0")]
    text = fixture_text("vllm-0.32-draft-t3.prom")

    def raw(name):
        return float(re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))

    assert s.drafts == raw("vllm:spec_decode_num_drafts_total")
    assert s.draft_tokens == raw("vllm:spec_decode_num_draft_tokens_total")
    assert s.accepted_tokens == raw("vllm:spec_decode_num_accepted_tokens_total")
    assert s.generation_tokens == raw("vllm:generation_tokens_total")
    assert sorted(s.accepted_per_position) == [0, 1, 2, 3]
    assert sum(s.accepted_per_position.values()) == s.accepted_tokens
    assert s.kv_capacity_tokens == float(re.search(r'kv_cache_size_tokens="(\d+)"', text).group(1))
    assert s.kv_capacity_bytes > 0 and s.kv_usage_ratio is not None
    assert s.running is not None and s.waiting is not None and s.preemptions is not None


def test_ngram_capture():
    s = read_vllm_metrics(fixture_text("vllm-0.32-ngram.prom")).engines[("tiny-target", "0")]
    assert s.draft_tokens > 0 and s.accepted_tokens is not None


def test_data_parallel_engines_and_several_models():
    base = fixture_text("vllm-0.32-draft-t3.prom")
    lines = []
    for line in base.splitlines():
        if 'engine="0"' not in line or line.startswith("#"):
            lines.append(line)
            continue
        for engine in range(8):
            for model in ("tiny-target", "other-model"):
                lines.append(line.replace('engine="0"', f'engine="{engine}"').replace(
                    'model_name="tiny-target"', f'model_name="{model}"'))
    snap = read_vllm_metrics("\n".join(lines))
    assert len(snap.engines) == 16
    assert snap.models == ["other-model", "tiny-target"]
    one = read_vllm_metrics(base).engines[("tiny-target", "0")]
    for key, sample in snap.engines.items():
        # cache_config_info carries no model_name: its copies for one engine are the same facts, not added up
        assert sample.drafts == one.drafts
        assert sample.kv_capacity_tokens == one.kv_capacity_tokens


def test_v0_names():
    s = read_vllm_metrics(V0_PAGE).engines[("old", "0")]
    assert s.kv_usage_ratio == 0.37
    assert (s.v0_acceptance_rate, s.v0_efficiency) == (0.61, 0.55)
    assert (s.accepted_tokens, s.draft_tokens, s.emitted_tokens, s.drafts) == (610, 1000, 800, None)


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf"])
def test_non_finite_counter_values_are_ignored(value):
    snap = read_vllm_metrics(f'vllm:spec_decode_num_drafts_total{{engine="0",model_name="m"}} {value}\n'
                             'vllm:num_requests_running{engine="0",model_name="m"} 1\n')
    assert snap.engines[("m", "0")].drafts is None


def baseline_page(text: str) -> str:
    """A real capture as a server without --speculative-config exports it: no spec_decode family at all."""
    return "\n".join(line for line in text.splitlines() if "spec_decode" not in line) + "\n"


@pytest.mark.parametrize("name", ["vllm-0.32-draft-t0.prom", "vllm-0.32-ngram.prom", "vllm-0.32-draft-t3.prom"])
def test_speculation_is_detected_from_the_spec_decode_families(name):
    text = fixture_text(name)
    assert read_vllm_metrics(text).speculating() == {"tiny-target": True}  # t0: every counter still at 0
    baseline = read_vllm_metrics(baseline_page(text))
    assert baseline.models == ["tiny-target"]  # still seen, through its other series
    assert baseline.speculating() == {"tiny-target": False}


def test_a_v0_page_speculates_by_its_gauges():
    assert set(read_vllm_metrics(V0_PAGE).speculating().values()) == {True}
