"""``specdec-sidecar plan``: what a draft model costs in GPU memory and KV-cache tokens, before deploying it.

Reads the Hugging Face ``config.json`` of a target and a draft, counts their parameters per architecture, and
sizes vLLM V1's KV cache the way vLLM 0.32 does (``vllm/v1/core/kv_cache_utils.py``; checked to the block
against real runs' ``cache_config_info`` in ``tests/fixtures/plan``):

* With ``draft_model`` speculation the draft's attention layers join the target's in one KV pool. A block
  holds ``block_size`` tokens of *every* layer, so
  ``num_blocks = budget // (block_size × Σ_layers 2 × kv_heads_per_gpu × head_dim × kv_dtype_bytes)``.
  The draft thus costs KV tokens twice: its weights shrink the budget, its layers widen every token.
* vLLM reports ``kv_cache_max_concurrency = num_blocks / ceil(L / block_size)`` and
  ``kv_cache_size_tokens = int(max_concurrency × L)`` for max model length ``L`` (that is
  ``num_blocks × block_size`` when ``L`` is a multiple of the block size, fewer otherwise).
* The budget is per GPU: ``--kv-cache-memory-bytes`` when given (vLLM's flag of that name), else
  ``GPU memory × utilization − weights / GPUs − --overhead-gib``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationInfo, field_validator

from sidecar.config import ExitCode
from sidecar.decision import DRAFT_SIZE_RATIO_SWEET_SPOT, DRAFT_VRAM_SHARE_WARN, draft_size_advice

GIB = 1024**3
GB = 1000**3

# Bytes per weight. int4 is the bare 4 bits: group-wise scales and zero points (e.g. one fp16 scale per 128
# weights, +1.6%) and layers checkpoints leave unquantised (often embeddings and lm_head) are not added.
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
KV_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
FLOAT_DTYPES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


@dataclass(frozen=True)
class Architecture:
    family: str
    qkv_bias: bool | None = False  # None: the config's ``attention_bias``
    o_bias: bool | None = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    tied_default: bool = False
    moe: str | None = None  # "mixtral" | "qwen3_moe"


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("Llama", qkv_bias=None, o_bias=None),
    "mistral": Architecture("Mistral"),
    "mixtral": Architecture("Mixtral (MoE)", moe="mixtral"),
    "qwen2": Architecture("Qwen2", qkv_bias=True),
    "qwen3": Architecture("Qwen3", qkv_bias=None, o_bias=None, qk_norm=True),
    "qwen3_moe": Architecture("Qwen3-MoE", qkv_bias=None, o_bias=None, qk_norm=True, moe="qwen3_moe"),
    "gemma": Architecture("Gemma", tied_default=True),
    "gemma2": Architecture("Gemma 2", norms_per_layer=4, tied_default=True),
    "gemma3_text": Architecture("Gemma 3 (text)", norms_per_layer=4, qk_norm=True, tied_default=True),
    "phi3": Architecture("Phi-3"),
}


@dataclass
class Model:
    path: str
    name: str
    model_type: str
    family: str
    params: int
    active_params: int
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None
    config_dtype: str | None
    quantized_as: str | None
    sliding_window: int | None
    directory: Path | None = field(default=None, repr=False)


def _require(cfg: dict, key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.json has no positive integer {key!r}")
    return value


def count_params(cfg: dict, arch: Architecture) -> tuple[int, int]:
    """(total, active per token) parameters of a decoder-only causal LM described by ``cfg``."""
    hidden = _require(cfg, "hidden_size")
    layers = _require(cfg, "num_hidden_layers")
    heads = _require(cfg, "num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    vocab = _require(cfg, "vocab_size")
    attention_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = attention_bias if arch.qkv_bias is None else arch.qkv_bias
    o_bias = attention_bias if arch.o_bias is None else arch.o_bias
    mlp_bias = bool(cfg.get("mlp_bias", False))

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attention = hidden * (q_out + 2 * kv_out) + q_out * hidden
    attention += (q_out + 2 * kv_out) * qkv_bias + hidden * o_bias
    attention += 2 * head_dim * arch.qk_norm
    norms = arch.norms_per_layer * hidden

    def dense_mlp(intermediate: int) -> int:  # gate, up, down
        return 3 * hidden * intermediate + (2 * intermediate + hidden) * mlp_bias

    total = active = 0
    for index in range(layers):
        if arch.moe == "mixtral":
            experts = _require(cfg, "num_local_experts")
            per_token = _require(cfg, "num_experts_per_tok")
            expert = dense_mlp(_require(cfg, "intermediate_size"))
            mlp, mlp_active = hidden * experts + experts * expert, hidden * experts + per_token * expert
        elif arch.moe == "qwen3_moe" and index not in (cfg.get("mlp_only_layers") or []) and (
            (index + 1) % (cfg.get("decoder_sparse_step") or 1) == 0
        ):
            experts = _require(cfg, "num_experts")
            per_token = _require(cfg, "num_experts_per_tok")
            expert = dense_mlp(_require(cfg, "moe_intermediate_size"))
            mlp, mlp_active = hidden * experts + experts * expert, hidden * experts + per_token * expert
        else:
            mlp = mlp_active = dense_mlp(_require(cfg, "intermediate_size"))
        total += attention + mlp + norms
        active += attention + mlp_active + norms

    tied = cfg.get("tie_word_embeddings", arch.tied_default)
    embeddings = vocab * hidden * (1 if tied else 2) + hidden  # + final norm
    return total + embeddings, active + embeddings


def _quantized_as(cfg: dict) -> str | None:
    """Weight precision a checkpoint's ``quantization_config`` declares, when it is one plan knows."""
    quant = cfg.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    method = str(quant.get("quant_method", "")).lower()
    if method in {"fp8", "fbgemm_fp8", "modelopt"} and "fp4" not in str(quant.get("quant_algo", "")).lower():
        return "fp8"
    if quant.get("load_in_4bit"):
        return "int4"
    if quant.get("load_in_8bit"):
        return "int8"
    bits = quant.get("bits") or quant.get("w_bit")
    if bits is None and method == "compressed-tensors":
        for group in (quant.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            if weights.get("num_bits") == 8 and weights.get("type") == "float":
                return "fp8"
            bits = weights.get("num_bits")
            break
    return {4: "int4", 8: "int8"}.get(bits)


def load_model(path: str) -> Model:
    """The model whose config.json is *path* (or lies in the directory *path*); ValueError says what is wrong."""
    given = Path(path)
    if given.is_dir():
        config_path, directory = given / "config.json", given
    else:
        config_path, directory = given, None
    try:
        cfg = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no such file {config_path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {config_path} as JSON ({error.__class__.__name__})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    model_type = cfg.get("model_type")
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    params, active = count_params(cfg, arch)
    heads = cfg["num_attention_heads"]
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    window = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    name = (directory or config_path.parent).resolve().name
    return Model(
        path=str(path), name=name, model_type=model_type, family=arch.family, params=params,
        active_params=active, layers=cfg["num_hidden_layers"], attention_heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, hidden_size=cfg["hidden_size"],
        vocab_size=cfg["vocab_size"], max_position_embeddings=cfg.get("max_position_embeddings"),
        config_dtype=FLOAT_DTYPES.get(str(dtype)) if dtype else None, quantized_as=_quantized_as(cfg),
        sliding_window=window if isinstance(window, int) else None, directory=directory,
    )  # fmt: skip


def activation_dtype(model: Model, weights: str) -> str:
    """The dtype vLLM computes (and, with ``--kv-cache-dtype auto``, caches KV) in.

    A float weight precision is itself; quantised weights compute in the config's dtype. float32 configs are
    served in bf16 on GPUs (vLLM's ``--dtype auto`` downcasts them); missing -> bf16.
    """
    if weights in {"fp32", "bf16", "fp16"}:
        return weights
    return model.config_dtype if model.config_dtype in {"bf16", "fp16"} else "bf16"


def default_weights_dtype(model: Model) -> str:
    if model.quantized_as:
        return model.quantized_as
    return model.config_dtype if model.config_dtype in {"bf16", "fp16"} else "bf16"


def kv_bytes_per_token(model: Model, kv_dtype: str, gpus: int = 1) -> int:
    """Σ over the model's layers of 2 (K and V) × KV heads held by one GPU × head_dim × bytes.

    With tensor parallelism each GPU holds ``max(1, kv_heads // gpus)`` heads (vLLM replicates KV heads when
    there are fewer than GPUs).
    """
    heads = max(1, model.kv_heads // gpus)
    return model.layers * 2 * heads * model.head_dim * KV_BYTES[kv_dtype]


@dataclass(frozen=True)
class Pool:
    """One KV pool as vLLM sizes it on one GPU."""

    budget_bytes: int
    bytes_per_token: int
    block_size: int
    max_model_len: int

    @property
    def num_blocks(self) -> int:
        if self.budget_bytes <= 0:
            return 0
        return self.budget_bytes // (self.block_size * self.bytes_per_token)

    @property
    def blocks_per_request(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def max_concurrency(self) -> float:
        """vLLM's ``kv_cache_max_concurrency``: requests of ``max_model_len`` tokens held at once."""
        return self.num_blocks / self.blocks_per_request

    @property
    def tokens(self) -> int:
        """vLLM's ``kv_cache_size_tokens`` (same float arithmetic, so the same integer)."""
        return int(self.max_concurrency * self.max_model_len)


def tokenizer_match(target: Model, draft: Model) -> dict:
    """Do the two models share a tokenizer? Files are compared only when both paths are directories."""
    result: dict = {"vocab_size_equal": target.vocab_size == draft.vocab_size}
    if target.directory is None or draft.directory is None:
        result["checked"] = "vocab_size only (pass model directories to compare tokenizers)"
        return result
    for filename in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        a, b = target.directory / filename, draft.directory / filename
        if a.is_file() and b.is_file():
            break
    else:
        result["checked"] = "vocab_size only (no tokenizer file found in both directories)"
        return result
    result["checked"] = filename
    if hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest():
        result["identical"] = True
        return result
    result["identical"] = False
    if filename == "tokenizer.json":
        try:
            va, vb = (_vocab(json.loads(p.read_text())) for p in (a, b))
        except (ValueError, AttributeError, TypeError):
            return result
        shared = sum(1 for token, index in va.items() if vb.get(token) == index)
        result["same_vocabulary"] = va == vb
        result["tokens_with_same_id"] = shared
        result["tokens"] = [len(va), len(vb)]
    return result


def _vocab(tokenizer: dict) -> dict[str, int]:
    vocab = dict((tokenizer.get("model") or {}).get("vocab") or {})
    if isinstance(vocab, list):  # unigram models list [piece, score]
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    for added in tokenizer.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    return vocab


def plan(args: PlanSettings) -> dict:
    """The plan for a validated pair (``PlanSettings`` loaded both configs and checked --gpus against them)."""
    target, draft, gpus = args.target, args.draft, args.gpus
    target_dtype = args.target_dtype or default_weights_dtype(target)
    draft_dtype = args.draft_dtype or args.target_dtype or default_weights_dtype(draft)
    compute_dtype = activation_dtype(target, target_dtype)
    kv_dtype = compute_dtype if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
    max_model_len = args.max_model_len or target.max_position_embeddings
    assert max_model_len, "PlanSettings checks the target gives a max_position_embeddings or --max-model-len is set"

    target_weights = int(target.params * WEIGHT_BYTES[target_dtype])
    draft_weights = int(draft.params * WEIGHT_BYTES[draft_dtype])
    kv_target = kv_bytes_per_token(target, kv_dtype)
    kv_draft = kv_bytes_per_token(draft, kv_dtype)
    kv_target_gpu = kv_bytes_per_token(target, kv_dtype, gpus)
    kv_draft_gpu = kv_bytes_per_token(draft, kv_dtype, gpus)

    notes: list[str] = []
    warnings: list[str] = []
    if args.kv_cache_memory_bytes is not None:
        budget_with = budget_without = args.kv_cache_memory_bytes
        memory = None
        notes.append("KV budget per GPU from --kv-cache-memory-bytes (as vLLM's flag: the same with or "
                     "without the draft)")
    else:
        usable = int(args.gpu_memory_gib * GIB * args.gpu_memory_utilization)
        overhead = int(args.overhead_gib * GIB)
        budget_with = usable - (target_weights + draft_weights) // gpus - overhead
        budget_without = usable - target_weights // gpus - overhead
        memory = {"gpu_memory_bytes": int(args.gpu_memory_gib * GIB), "usable_bytes": usable,
                  "overhead_bytes": overhead}
        notes.append(
            "KV budget per GPU = GPU memory × utilization − weights / GPUs"
            + (f" − {args.overhead_gib:g} GiB overhead" if overhead else
               "; activations, CUDA graphs and non-torch memory not subtracted (--overhead-gib)")
        )
    with_draft = Pool(budget_with, kv_target_gpu + kv_draft_gpu, args.block_size, max_model_len)
    without = Pool(budget_without, kv_target_gpu, args.block_size, max_model_len)

    size_ratio = target.params / draft.params
    advice = draft_size_advice(size_ratio)
    low, high = DRAFT_SIZE_RATIO_SWEET_SPOT
    if advice != "sweet_spot":
        why = ("too large: each draft step costs much of a target step" if advice == "too_large"
               else "too small: expect lower acceptance")
        warnings.append(f"size ratio 1:{size_ratio:.1f} is outside the 1:{low:g}–1:{high:g} sweet spot "
                        f"(draft {why})")
    draft_kv_bytes = with_draft.num_blocks * args.block_size * kv_draft_gpu
    used = (target_weights + draft_weights) // gpus + max(budget_with, 0)
    draft_share = (draft_weights // gpus + draft_kv_bytes) / used if used > 0 else None
    draft_weights_share = (draft_weights // gpus) / used if used > 0 else None
    if draft_share is not None and draft_share > DRAFT_VRAM_SHARE_WARN:
        warnings.append(f"the draft takes {draft_share:.0%} of the memory vLLM uses (weights + KV), above "
                        f"{DRAFT_VRAM_SHARE_WARN:.0%}")
    if budget_with <= 0:
        warnings.append("target and draft weights do not fit: no memory left for the KV cache")
    elif with_draft.num_blocks < with_draft.blocks_per_request:
        warnings.append(f"vLLM would refuse to start: the KV cache holds {with_draft.tokens} tokens, "
                        f"fewer than one request of --max-model-len {max_model_len}")
    tokenizer = tokenizer_match(target, draft)
    if not tokenizer["vocab_size_equal"]:
        warnings.append(f"vocab sizes differ ({target.vocab_size} vs {draft.vocab_size}): vLLM's draft_model "
                        "refuses this unless use_heterogeneous_vocab (greedy drafting only)")
    elif tokenizer.get("identical") is False and not tokenizer.get("same_vocabulary", True):
        warnings.append("tokenizers differ: the draft's token ids do not mean the target's")
    for model in (target, draft):
        if model.sliding_window and model.max_position_embeddings and model.sliding_window < max_model_len:
            notes.append(f"{model.name} has sliding-window attention ({model.sliding_window}); plan "
                         "counts every layer as full attention (vLLM's figure when all layers share the "
                         "window; a lower bound on tokens when sliding and full layers mix)")
        if model.active_params != model.params:
            notes.append(f"{model.name} is a mixture of experts: {model.active_params / 1e9:.2f} B of "
                         f"{model.params / 1e9:.2f} B parameters active per token")
    speculative = None
    if args.num_speculative_tokens:
        k = args.num_speculative_tokens
        per_request = -(-(max_model_len + k) // args.block_size)
        speculative = {"num_speculative_tokens": k,
                       "max_concurrency_with_lookahead": with_draft.num_blocks / per_request}

    def model_json(model: Model, dtype: str, weights: int, kv: int, kv_gpu: int) -> dict:
        info = asdict(model)
        info.pop("directory")
        info.update(dtype=dtype, weights_bytes=weights, kv_bytes_per_token=kv,
                    kv_bytes_per_token_per_gpu=kv_gpu)
        return info

    return {
        "target": model_json(target, target_dtype, target_weights, kv_target, kv_target_gpu),
        "draft": model_json(draft, draft_dtype, draft_weights, kv_draft, kv_draft_gpu),
        "size_ratio": size_ratio,
        "size_advice": advice,
        "kv_cache_dtype": kv_dtype,
        "kv_bytes_per_token": {"target": kv_target, "draft": kv_draft, "total": kv_target + kv_draft},
        "kv_bytes_per_token_per_gpu": {"target": kv_target_gpu, "draft": kv_draft_gpu},
        "gpus": gpus,
        "memory": memory,
        "block_size": args.block_size,
        "max_model_len": max_model_len,
        "kv_budget_bytes": {"with_draft": budget_with, "without_draft": budget_without},
        "num_blocks": with_draft.num_blocks,
        "num_blocks_without_draft": without.num_blocks,
        "kv_cache_tokens": with_draft.tokens,
        "kv_cache_tokens_without_draft": without.tokens,
        "kv_cache_tokens_lost_to_draft": without.tokens - with_draft.tokens,
        "max_concurrency": with_draft.max_concurrency,
        "max_concurrency_without_draft": without.max_concurrency,
        "draft_vram_share": draft_share,
        "draft_weights_share": draft_weights_share,
        "speculative": speculative,
        "tokenizer": tokenizer,
        "warnings": warnings,
        "notes": notes,
    }


def _gb(value: float) -> str:
    return f"{value / GB:,.2f} GB"


def _kib(value: float) -> str:
    return f"{value / 1024:,.1f} KiB" if value % 1024 else f"{value // 1024:,} KiB"


def render(result: dict) -> str:
    t, d = result["target"], result["draft"]
    lines = []
    for role, m in (("target", t), ("draft", d)):
        active = f" ({m['active_params'] / 1e9:.2f} B active)" if m["active_params"] != m["params"] else ""
        lines.append(
            f"{role:<7}{m['name']}: {m['family']}, {m['params']:,} params{active}, {m['layers']} layers, "
            f"{m['kv_heads']} KV heads × {m['head_dim']}; {m['dtype']} weights {_gb(m['weights_bytes'])}; "
            f"KV {m['kv_bytes_per_token']:,} B/token ({_kib(m['kv_bytes_per_token'])})"
        )
    low, high = DRAFT_SIZE_RATIO_SWEET_SPOT
    advice = {"sweet_spot": "in", "too_large": "draft too large for", "too_small": "draft too small for"}
    lines.append(f"size ratio 1:{result['size_ratio']:.1f} ({advice[result['size_advice']]} the "
                 f"1:{low:g}–1:{high:g} sweet spot)")
    tok = result["tokenizer"]
    if "identical" in tok:
        what = "identical" if tok["identical"] else (
            "same vocabulary" if tok.get("same_vocabulary") else "DIFFERENT")
        lines.append(f"tokenizer: {what} ({tok['checked']})")
    else:
        lines.append(f"tokenizer: vocab size {'equal' if tok['vocab_size_equal'] else 'DIFFERENT'}; "
                     f"checked {tok['checked']}")
    gpus = result["gpus"]
    budget = result["kv_budget_bytes"]
    if result["memory"]:
        mem = result["memory"]
        lines.append(f"memory: {gpus} GPU(s) × {mem['gpu_memory_bytes'] / GIB:g} GiB, usable per GPU "
                     f"{_gb(mem['usable_bytes'])}; KV budget per GPU {_gb(budget['with_draft'])} with the "
                     f"draft, {_gb(budget['without_draft'])} without")
    else:
        lines.append(f"memory: KV budget per GPU {budget['with_draft']:,} B (--kv-cache-memory-bytes), "
                     f"{gpus} GPU(s)")
    lines.append(
        f"KV cache ({result['kv_cache_dtype']}, block {result['block_size']}, per GPU "
        f"{result['kv_bytes_per_token_per_gpu']['target'] + result['kv_bytes_per_token_per_gpu']['draft']:,} "
        f"B/token with draft): {result['kv_cache_tokens']:,} tokens ({result['num_blocks']:,} blocks) with "
        f"the draft, {result['kv_cache_tokens_without_draft']:,} ({result['num_blocks_without_draft']:,} "
        "blocks) without"
    )
    lost = result["kv_cache_tokens_lost_to_draft"]
    if result["kv_cache_tokens_without_draft"]:
        lines.append(f"the draft costs {lost:,} KV tokens "
                     f"({lost / result['kv_cache_tokens_without_draft']:.1%} of the pool)")
    lines.append(f"max concurrency at {result['max_model_len']:,} tokens: {result['max_concurrency']:.2f} "
                 f"with the draft, {result['max_concurrency_without_draft']:.2f} without")
    if result["speculative"]:
        spec = result["speculative"]
        lines.append(f"  with {spec['num_speculative_tokens']} lookahead slots per request: "
                     f"{spec['max_concurrency_with_lookahead']:.2f}")
    if result["draft_vram_share"] is not None:
        lines.append(f"draft share of the memory vLLM uses: {result['draft_vram_share']:.1%} (weights "
                     f"{result['draft_weights_share']:.1%} + its layers' KV pages; warn above "
                     f"{DRAFT_VRAM_SHARE_WARN:.0%})")
    lines += [f"WARNING: {w}" for w in result["warnings"]]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _model(path: object) -> Model:
    return path if isinstance(path, Model) else load_model(str(path))


WeightDtype = Literal[tuple(sorted(WEIGHT_BYTES))]  # type: ignore[valid-type]
KvDtype = Literal[("auto", *sorted(KV_BYTES))]  # type: ignore[valid-type]


class PlanSettings(BaseModel):
    """Everything ``plan`` can be told; each field is the flag of the same name. The two configs are read
    while validating, so an unreadable or unsupported model is a bad ``--target`` / ``--draft`` like any other."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    target: Annotated[Model, PlainValidator(_model)] = Field(
        description="target model directory or its config.json", json_schema_extra={"metavar": "PATH"})
    draft: Annotated[Model, PlainValidator(_model)] = Field(
        description="draft model directory or its config.json", json_schema_extra={"metavar": "PATH"})
    target_dtype: WeightDtype | None = Field(
        None, description="weight precision (unset = the config's quantization or dtype; float32 -> bf16)")
    draft_dtype: WeightDtype | None = Field(
        None, description="draft weight precision (unset = --target-dtype when given, else from the draft's config)")
    kv_cache_dtype: KvDtype = Field("auto", description="KV cache dtype; auto = the target's compute dtype, as vLLM")
    gpus: int = Field(1, gt=0, description="tensor-parallel GPUs")
    gpu_memory_gib: float = Field(80.0, gt=0, allow_inf_nan=False, description="memory of one GPU in GiB")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM's --gpu-memory-utilization")
    overhead_gib: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="per-GPU memory for activations, CUDA graphs, non-torch allocations")
    kv_cache_memory_bytes: int | None = Field(
        None, gt=0, description="per-GPU KV budget, as vLLM's flag; overrides the memory model above",
        json_schema_extra={"metavar": "B"})
    block_size: int = Field(16, gt=0, description="KV block size in tokens")
    max_model_len: int | None = Field(
        None, gt=0, description="max tokens per request (unset = the target's max_position_embeddings)",
        json_schema_extra={"metavar": "L"})
    num_speculative_tokens: int | None = Field(
        None, gt=0, description="draft tokens per step: also show concurrency with K lookahead slots per request",
        json_schema_extra={"metavar": "K"})
    as_json: bool = Field(False, alias="json", description="print the plan as JSON")

    @field_validator("gpus")
    @classmethod
    def _even_split(cls, gpus: int, info: ValidationInfo) -> int:
        for flag in ("target", "draft"):
            model = info.data.get(flag)
            if model is not None and model.attention_heads % gpus:
                raise ValueError(f"{gpus} GPUs do not divide the {model.attention_heads} attention heads of "
                                 f"--{flag} {model.name} (vLLM needs an even split)")
        return gpus

    @field_validator("max_model_len")
    @classmethod
    def _length_known(cls, value: int | None, info: ValidationInfo) -> int | None:
        target = info.data.get("target")
        if value is None and target is not None and not target.max_position_embeddings:
            raise ValueError("the target's config has no max_position_embeddings; give it")
        return value


def run(settings: PlanSettings) -> ExitCode:
    result = plan(settings)
    print(json.dumps(result, indent=2) if settings.as_json else render(result))
    return ExitCode.OK
