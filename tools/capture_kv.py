"""Record what a real vLLM says about its KV cache, for `plan`'s exactness tests.

    .venv/bin/python tools/capture_kv.py --out tests/fixtures/plan

Starts vLLM (CPU build) on the tiny pair under ``models/`` once per case below, one server at a time, with
and without draft-model speculation, and saves the whole /metrics page of each idle server. The test reads
``vllm:cache_config_info`` (``kv_cache_memory_bytes``, ``block_size``, ``num_gpu_blocks``,
``kv_cache_size_tokens``, ``kv_cache_max_concurrency``) from those pages. ``MANIFEST.json`` records, per
page, the exact server flags and environment that produced it.

    .venv/bin/python tools/capture_kv.py --param-counts tests/fixtures/plan/configs

instead counts the parameters of every ``*/config.json`` under that directory with ``transformers`` (from
vLLM's virtualenv, models built on the ``meta`` device: no weights are downloaded or allocated) and writes
``PARAM_COUNTS.json`` there, the reference `plan`'s own counting is tested against.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack.vllm_server import (  # noqa: E402
    DEFAULT_MODELS,
    VllmServer,
    draft_model_config,
    get_text,
    vllm_python,
)

COUNT_PARAMS = """
import json, sys, pathlib, torch, transformers
out = {"transformers_version": transformers.__version__, "counts": {}}
for config_path in sorted(pathlib.Path(sys.argv[1]).glob("*/config.json")):
    config = transformers.AutoConfig.from_pretrained(config_path.parent)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    out["counts"][config_path.parent.name] = {
        "class": type(model).__name__, "params": sum(p.numel() for p in model.parameters())}
print(json.dumps(out, indent=2))
"""


@dataclass
class KvServer(VllmServer):
    """A VllmServer that can drop ``VLLM_CPU_KVCACHE_SPACE`` so ``--kv-cache-memory-bytes`` takes effect.

    vLLM's CPU platform replaces ``--kv-cache-memory-bytes`` with ``VLLM_CPU_KVCACHE_SPACE`` GiB whenever that
    variable is set, and the launcher always sets it.
    """

    unset_kvcache_space: bool = False

    def command(self) -> list[str]:
        cmd = super().command()
        return ["env", "-u", "VLLM_CPU_KVCACHE_SPACE", *cmd] if self.unset_kvcache_space else cmd


# name -> (speculative?, extra vLLM flags, drop VLLM_CPU_KVCACHE_SPACE?)
CASES: dict[str, tuple[bool, list[str], bool]] = {
    "fp32-1gib-draft": (True, [], False),
    "fp32-1gib-nospec": (False, [], False),
    "fp32-odd-draft": (True, ["--kv-cache-memory-bytes", "50000000", "--block-size", "32",
                              "--max-model-len", "500"], True),
    "fp32-odd-nospec": (False, ["--kv-cache-memory-bytes", "50000000", "--block-size", "32",
                                "--max-model-len", "500"], True),
    "bf16-1gib-draft": (True, ["--dtype", "bfloat16"], False),
    "bf16-1gib-nospec": (False, ["--dtype", "bfloat16"], False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/plan"))
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--log", type=Path, default=Path(".cache/capture-kv.log"))
    parser.add_argument("--only", help="comma-separated case names (default: all)")
    parser.add_argument("--param-counts", type=Path, metavar="DIR",
                        help="count parameters of DIR/*/config.json with transformers instead")
    args = parser.parse_args()
    if args.param_counts:
        counted = subprocess.run([str(vllm_python()), "-c", COUNT_PARAMS, str(args.param_counts)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        (args.param_counts / "PARAM_COUNTS.json").write_text(counted.stdout)
        print(counted.stdout)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": {}}
    names = args.only.split(",") if args.only else list(CASES)
    for name in names:
        speculative, extra, unset = CASES[name]
        spec = draft_model_config(args.models / "tiny-draft") if speculative else None
        server = KvServer(model=args.models / "tiny-target", speculative=spec, extra_args=extra,
                          unset_kvcache_space=unset, log_path=args.log, startup_timeout=600)
        with server:
            version = json.loads(get_text(server.url + "/version"))["version"]
            page = get_text(server.url + "/metrics")
        filename = f"vllm-0.32-{name}.prom"
        (args.out / filename).write_text(page)
        flags = server.command()
        flags = flags[flags.index("-m") + 1:]
        manifest["vllm_version"] = version
        manifest["files"][filename] = {
            "what": "/metrics of an idle vLLM right after start-up (nothing was sent)",
            "target": "models/tiny-target",
            "speculative_config": ({**spec, "model": "models/tiny-draft"} if spec else None),
            "vllm_args": [json.dumps({**spec, "model": "models/tiny-draft"}) if spec and a.startswith("{")
                          else "models/" + Path(a).name if a.startswith(str(args.models)) else a for a in flags],
            "env": {"VLLM_CPU_KVCACHE_SPACE": None if unset else "1"},
        }
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"saved {filename}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
