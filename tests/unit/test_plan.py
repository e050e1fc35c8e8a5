"""`specdec-sidecar plan`: parameter counts, KV arithmetic equal to real vLLM runs, the seed's memory tables.

References, none computed by the code under test:
- ``fixtures/plan/configs/PARAM_COUNTS.json``: parameters counted by transformers' own model classes built on
  the meta device from the same config.json files (``tools/capture_kv.py --param-counts``);
- the tiny pair's real checkpoints (safetensors headers);
- ``fixtures/plan/vllm-0.32-*.prom``: /metrics of real vLLM 0.32 servers (CPU build) with and without draft-model
  speculation, whose ``vllm:cache_config_info`` states the KV pool vLLM built (``tools/capture_kv.py``).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.upstream.exposition import parse

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "plan"
CONFIGS = FIXTURES / "configs"
MODELS = REPO / "models"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
GB = 1e9


def run_plan(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def exit_code(argv: list[str]) -> int | str | None:
    """main()'s status whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exited:
        return exited.code


def pair(target: str, draft: str, *argv: str) -> list[str]:
    return ["--target", str(CONFIGS / target), "--draft", str(CONFIGS / draft), *argv]


# -- parameters from config.json -------------------------------------------------------------------------------

REFERENCE_COUNTS = json.loads((CONFIGS / "PARAM_COUNTS.json").read_text())["counts"]


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_params_equal_transformers_count(capsys, name):
    result = run_plan(capsys, "--target", str(CONFIGS / name), "--draft", str(CONFIGS / "Qwen3-0.6B"),
                      "--max-model-len", "4096")
    assert result["target"]["params"] == REFERENCE_COUNTS[name]["params"]


def test_every_supported_family_has_a_reference_config():
    from sidecar.commands.plan import ARCHITECTURES

    seen = {json.loads((CONFIGS / name / "config.json").read_text())["model_type"] for name in REFERENCE_COUNTS}
    assert seen == set(ARCHITECTURES)


def test_moe_active_params(capsys):
    mixtral = run_plan(capsys, *pair("Mixtral-8x7B-v0.1", "Mistral-7B-Instruct-v0.3"))["target"]
    # 2 of 8 experts per token: everything but 6 experts' MLPs (3 × 4096 × 14336 each, 32 layers).
    assert mixtral["active_params"] == mixtral["params"] - 32 * 6 * 3 * 4096 * 14336
    qwen = run_plan(capsys, *pair("Qwen3-30B-A3B", "Qwen3-0.6B"))["target"]
    assert qwen["active_params"] == qwen["params"] - 48 * 120 * 3 * 2048 * 768


def safetensors_tensors(path: Path) -> dict:
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header


@pytest.mark.parametrize("name", ["tiny-target", "tiny-draft"])
def test_tiny_pair_params_and_bytes_equal_checkpoint(capsys, name):
    tensors = safetensors_tensors(MODELS / name / "model.safetensors")
    assert {t["dtype"] for t in tensors.values()} == {"F32"}
    result = run_plan(capsys, "--target", str(MODELS / name), "--draft", str(MODELS / "tiny-draft"),
                      "--target-dtype", "fp32")
    assert result["target"]["params"] == sum(math.prod(t["shape"]) for t in tensors.values())
    assert result["target"]["weights_bytes"] == sum(t["data_offsets"][1] - t["data_offsets"][0]
                                                    for t in tensors.values())


# -- KV arithmetic: exactly vLLM's own figures -----------------------------------------------------------------

def cache_config(page: str) -> dict[str, str]:
    (sample,) = [s for s in parse(page, {"vllm:cache_config_info"}).samples]
    return dict(sample.labels)


def flag(args: list[str], name: str, default: str) -> str:
    """The value vLLM used: its last occurrence (the launcher's defaults come first, a case's own flags after)."""
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == name]
    return values[-1] if values else default


CAPTURES = sorted(MANIFEST["files"])


def test_captures_cover_draft_and_no_draft():
    assert MANIFEST["vllm_version"].startswith("0.32")
    kinds = {bool(MANIFEST["files"][name]["speculative_config"]) for name in CAPTURES}
    assert kinds == {True, False}
    assert len(CAPTURES) >= 4


@pytest.mark.parametrize("capture", CAPTURES)
def test_plan_equals_vllm_cache_config_info(capsys, capture):
    """Given the budget and block size a real vLLM run reported, plan gives that run's blocks and tokens."""
    recorded = MANIFEST["files"][capture]
    info = cache_config(Path(FIXTURES / capture).read_text())
    args = recorded["vllm_args"]
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[flag(args, "--dtype", "float32")]
    assert info["cache_dtype"] == "auto"  # KV in the model's dtype: what --kv-cache-dtype auto models
    result = run_plan(
        capsys, "--target", str(MODELS / "tiny-target"), "--draft", str(MODELS / "tiny-draft"),
        "--target-dtype", dtype,
        "--kv-cache-memory-bytes", info["kv_cache_memory_bytes"], "--block-size", info["block_size"],
        "--max-model-len", flag(args, "--max-model-len", "512"),
    )  # fmt: skip
    suffix = "" if recorded["speculative_config"] else "_without_draft"
    assert result["num_blocks" + suffix] == int(info["num_gpu_blocks"])
    assert result["kv_cache_tokens" + suffix] == int(info["kv_cache_size_tokens"])
    assert result["max_concurrency" + suffix] == float(info["kv_cache_max_concurrency"])


def test_odd_capture_is_not_blocks_times_block_size():
    """The 500-token capture: vLLM reports int(blocks / ceil(L / block) × L), not blocks × block_size."""
    info = cache_config((FIXTURES / "vllm-0.32-fp32-odd-draft.prom").read_text())
    assert int(info["kv_cache_size_tokens"]) != int(info["num_gpu_blocks"]) * int(info["block_size"])


@pytest.mark.parametrize("case", ["fp32-1gib", "fp32-odd", "bf16-1gib"])
def test_one_plan_gives_both_runs(capsys, case):
    """The same budget with and without the draft: the draft's layers alone cost these tokens."""
    with_draft = cache_config((FIXTURES / f"vllm-0.32-{case}-draft.prom").read_text())
    without = cache_config((FIXTURES / f"vllm-0.32-{case}-nospec.prom").read_text())
    assert with_draft["kv_cache_memory_bytes"] == without["kv_cache_memory_bytes"]
    args = MANIFEST["files"][f"vllm-0.32-{case}-draft.prom"]["vllm_args"]
    dtype = {"float32": "fp32", "bfloat16": "bf16"}[flag(args, "--dtype", "float32")]
    result = run_plan(
        capsys, "--target", str(MODELS / "tiny-target"), "--draft", str(MODELS / "tiny-draft"),
        "--target-dtype", dtype, "--kv-cache-memory-bytes", with_draft["kv_cache_memory_bytes"],
        "--block-size", with_draft["block_size"], "--max-model-len", flag(args, "--max-model-len", "512"),
    )  # fmt: skip
    assert (result["kv_cache_tokens"], result["kv_cache_tokens_without_draft"]) == (
        int(with_draft["kv_cache_size_tokens"]), int(without["kv_cache_size_tokens"]))
    assert result["kv_cache_tokens_lost_to_draft"] > 0


def test_kv_bytes_per_token_of_the_tiny_pair(capsys):
    result = run_plan(capsys, "--target", str(MODELS / "tiny-target"), "--draft", str(MODELS / "tiny-draft"),
                      "--target-dtype", "fp32")
    # 4 layers × 2 × 4 KV heads × 64 × 4 B and 1 layer × 2 × 2 × 64 × 4 B.
    assert result["kv_bytes_per_token"] == {"target": 8192, "draft": 1024, "total": 9216}
    assert result["kv_cache_dtype"] == "fp32"


# -- the seed's memory tables: Llama-3.1-70B target, Llama-3.1-8B draft, 2 × 80 GB -----------------------------

# Seed figures: weights in GB. The seed multiplies the nominal 70 B / 8 B parameters, so it is within 1% of
# the exact count (70.55 B / 8.03 B) once rounded to whole GB; plan's own figures are exact to the byte below.
SEED_WEIGHTS_GB = {"bf16": (141, 16), "int8": (70, 8), "int4": (35, 4)}


@pytest.mark.parametrize("dtype", sorted(SEED_WEIGHTS_GB))
def test_seed_memory_table(capsys, dtype):
    result = run_plan(capsys, *pair("Llama-3.1-70B", "Llama-3.1-8B", "--target-dtype", dtype, "--gpus", "2",
                                    "--gpu-memory-gib", "80", "--max-model-len", "8192"))
    bytes_per_weight = {"bf16": 2, "int8": 1, "int4": 0.5}[dtype]
    assert result["target"]["weights_bytes"] == 70_553_706_496 * bytes_per_weight
    assert result["draft"]["weights_bytes"] == 8_030_261_248 * bytes_per_weight
    seed_target, seed_draft = SEED_WEIGHTS_GB[dtype]
    assert result["target"]["weights_bytes"] / GB == pytest.approx(seed_target, rel=0.01)
    assert result["draft"]["weights_bytes"] / GB == pytest.approx(seed_draft, rel=0.01)
    # KV per token: 80 layers × 2 × 8 KV heads × 128 × 2 B = 320 KiB; 8B: 32 layers -> 128 KiB. Per GPU half.
    assert result["kv_bytes_per_token"] == {"target": 327_680, "draft": 131_072, "total": 458_752}
    assert result["kv_bytes_per_token_per_gpu"] == {"target": 163_840, "draft": 65_536}
    assert result["kv_cache_dtype"] == "bf16"
    assert result["size_ratio"] == pytest.approx(8.786, abs=0.001) and result["size_advice"] == "sweet_spot"
    usable = int(80 * 2**30 * 0.9)
    assert result["kv_budget_bytes"]["without_draft"] == usable - result["target"]["weights_bytes"] // 2


def test_seed_table_figures(capsys):
    """The figures docs/plan.md shows (KV tokens per GPU, block 16, utilization 0.9, 8192-token requests)."""
    figures = {}
    for dtype in ("bf16", "int8", "int4"):
        r = run_plan(capsys, *pair("Llama-3.1-70B", "Llama-3.1-8B", "--target-dtype", dtype, "--gpus", "2",
                                   "--max-model-len", "8192"))
        figures[dtype] = (r["kv_cache_tokens"], r["kv_cache_tokens_without_draft"], round(r["max_concurrency"], 2))
    assert figures == {
        "bf16": (0, 41_232, 0.0),
        "int8": (165_728, 256_544, 20.23),
        "int4": (251_392, 364_192, 30.69),
    }


def test_bf16_pair_does_not_fit_at_default_utilization(capsys):
    result = run_plan(capsys, *pair("Llama-3.1-70B", "Llama-3.1-8B", "--gpus", "2"))
    assert result["target"]["dtype"] == "bf16"  # from the config's torch_dtype
    assert result["kv_budget_bytes"]["with_draft"] < 0 < result["kv_budget_bytes"]["without_draft"]
    assert any("do not fit" in w for w in result["warnings"])


# -- other behaviour -------------------------------------------------------------------------------------------

def test_json_keys(capsys):
    result = run_plan(capsys, *pair("Llama-3.1-70B", "Llama-3.1-8B", "--target-dtype", "int4", "--gpus", "2"))
    for key in ("size_ratio", "kv_cache_tokens", "kv_cache_tokens_without_draft", "draft_vram_share"):
        assert key in result
    for role in ("target", "draft"):
        assert result[role]["params"] > 0 and result[role]["weights_bytes"] > 0
        assert result["kv_bytes_per_token"][role] > 0
    assert result["max_model_len"] == 131072  # the target's max_position_embeddings


def test_kv_heads_replicated_when_fewer_than_gpus(capsys):
    # Gemma 3 1B has one KV head: with 2 GPUs each holds a copy, so per-GPU KV equals the whole model's.
    result = run_plan(capsys, *pair("gemma-3-1b-it", "gemma-3-1b-it", "--gpus", "2", "--max-model-len", "4096"))
    assert result["kv_bytes_per_token_per_gpu"]["target"] == result["kv_bytes_per_token"]["target"]
    assert result["kv_bytes_per_token"]["target"] == 26 * 2 * 1 * 256 * 2


def test_fp8_kv_halves_bytes_per_token(capsys):
    bf16 = run_plan(capsys, *pair("Llama-3.1-70B", "Llama-3.1-8B"))
    fp8 = run_plan(capsys, *pair("Llama-3.1-70B", "Llama-3.1-8B", "--kv-cache-dtype", "fp8"))
    assert fp8["kv_bytes_per_token"]["target"] * 2 == bf16["kv_bytes_per_token"]["target"]


def test_quantization_config_sets_weight_precision(capsys, tmp_path):
    config = json.loads((CONFIGS / "Llama-3.1-8B" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_plan(capsys, "--target", str(CONFIGS / "Llama-3.1-70B"), "--draft", str(tmp_path))
    assert result["draft"]["dtype"] == "int4"
    assert result["draft"]["weights_bytes"] == 8_030_261_248 // 2
    assert result["kv_cache_dtype"] == "bf16"  # KV stays in the compute dtype


def test_size_ratio_and_share_warnings(capsys):
    result = run_plan(capsys, *pair("Qwen2.5-7B", "Qwen2.5-0.5B", "--max-model-len", "8192"))
    assert result["size_advice"] == "too_small" and result["size_ratio"] > 12
    assert any("sweet spot" in w for w in result["warnings"])
    result = run_plan(capsys, *pair("Llama-3.1-70B", "Llama-3.1-8B", "--target-dtype", "int4", "--gpus", "2"))
    assert result["draft_vram_share"] > 0.15 and any("15%" in w for w in result["warnings"])
    assert result["draft_weights_share"] < result["draft_vram_share"]


def test_tokenizer_match_and_mismatch(capsys, tmp_path):
    result = run_plan(capsys, "--target", str(MODELS / "tiny-target"), "--draft", str(MODELS / "tiny-draft"))
    assert result["tokenizer"]["identical"] is True and result["tokenizer"]["checked"] == "tokenizer.json"
    tokenizer = json.loads((MODELS / "tiny-draft" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "config.json").write_text((MODELS / "tiny-draft" / "config.json").read_text())
    result = run_plan(capsys, "--target", str(MODELS / "tiny-target"), "--draft", str(tmp_path))
    assert result["tokenizer"]["identical"] is False and result["tokenizer"]["same_vocabulary"] is False
    assert result["tokenizer"]["tokens_with_same_id"] == result["tokenizer"]["tokens"][0] - 2
    assert any("tokenizers differ" in w for w in result["warnings"])
    result = run_plan(capsys, *pair("Llama-3.1-70B", "Mistral-7B-Instruct-v0.3"))
    assert any("vocab sizes differ" in w for w in result["warnings"])
    # Same tokenizer, different padded embedding rows: vLLM 0.32 compares vocab_size and refuses this pair.
    result = run_plan(capsys, *pair("Qwen2.5-7B", "Qwen2.5-0.5B"))
    assert any("vocab sizes differ (152064 vs 151936)" in w for w in result["warnings"])


def test_screen_output(capsys):
    assert main(["plan", *pair("Llama-3.1-70B", "Llama-3.1-8B", "--target-dtype", "int8", "--gpus", "2",
                               "--max-model-len", "8192")]) == 0
    out = capsys.readouterr().out
    assert "Llama, 70,553,706,496 params" in out
    assert "165,728 tokens (10,358 blocks) with the draft, 256,544 (16,034 blocks) without" in out
    assert "1:8.8 (in the 1:8–1:12 sweet spot)" in out


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--block-size", "0"], "--block-size"),
        (["--block-size", "x"], "--block-size"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
        (["--kv-cache-memory-bytes", "-1"], "--kv-cache-memory-bytes"),
        (["--target-dtype", "fp4"], "--target-dtype"),
        (["--kv-cache-dtype", "int4"], "--kv-cache-dtype"),
        (["--gpus", "3"], "--gpus"),
        (["--overhead-gib", "nan"], "--overhead-gib"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv, named):
    assert exit_code(["plan", "--target", str(MODELS / "tiny-target"), "--draft", str(MODELS / "tiny-draft"),
                      *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err


@pytest.mark.parametrize(
    "target, named",
    [
        ("missing-dir", "--target"),
        ("not-json", "--target"),
        ("unsupported", "--target"),
    ],
)
def test_bad_models_exit_2_with_one_line(capsys, tmp_path, target, named):
    (tmp_path / "not-json").mkdir()
    (tmp_path / "not-json" / "config.json").write_text("{")
    (tmp_path / "unsupported").mkdir()
    (tmp_path / "unsupported" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert exit_code(["plan", "--target", str(tmp_path / target), "--draft", str(MODELS / "tiny-draft")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err
