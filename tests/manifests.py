"""What the chart and ``inject`` tests share about Kubernetes objects: reading rendered YAML, finding a pod's
containers and the owner of a port, and asking vLLM 0.32's own argument parser (and engine config) whether it
takes the server commands they wrote."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "specdec-sidecar"
HELM = os.environ.get("HELM") or str(ROOT / ".tools" / "bin" / "helm")
KUBE_VERSION = "1.30.0"


def helm_template(*args: str, chart: Path = CHART, namespace: str = "llm",
                  check: bool = True) -> subprocess.CompletedProcess:
    """``helm template rel <chart>`` for Kubernetes 1.30 (the project's chart unless *chart*); with *check*, a
    failed render fails the test with helm's message."""
    proc = subprocess.run([HELM, "template", "rel", str(chart), "--namespace", namespace, "--kube-version",
                           KUBE_VERSION, *args], capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"helm template {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def docs(text: str) -> list[dict]:
    """The objects of a multi-document YAML text, without the empty documents."""
    return [d for d in yaml.safe_load_all(text) if d is not None]


def container(spec: dict, name: str) -> dict:
    """The one container (init or ordinary) called *name* in a pod spec."""
    found = [c for c in (spec.get("initContainers") or []) + spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"container {name}: {len(found)} found"
    return found[0]


def owner_of(spec: dict, port) -> str:
    """The container whose declared port a Service / pool / router reaching *port* (number or name) ends at."""
    owners = [c["name"] for c in (spec.get("initContainers") or []) + spec["containers"]
              for p in c.get("ports") or [] if port in (p.get("name"), p["containerPort"])]  # fmt: skip
    assert len(owners) == 1, f"port {port}: {owners}"
    return owners[0]


VLLM_CHECK = r"""
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.engine.arg_utils import AsyncEngineArgs

results = {}
for name, (args, engine) in json.loads(sys.argv[1]).items():
    try:
        parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(args)
        validate_parsed_serve_args(parsed)
        result = {"ok": True, "host": parsed.host, "port": parsed.port,
                  "force_usage": parsed.enable_force_include_usage}
        if engine:
            config = AsyncEngineArgs.from_cli_args(parsed).create_engine_config()
            result["per_request"] = config.observability_config.per_request_spec_decode_metrics
            result["spec"] = config.speculative_config.method if config.speculative_config else None
        results[name] = result
    except BaseException as error:  # argparse exits; config validation raises
        results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
print("RESULTS " + json.dumps(results))
"""


def vllm_python() -> Path | None:
    """vLLM's virtualenv interpreter (``make vllm``), when it and the embedded tiny models are here."""
    python = Path(os.environ.get("VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    return python if python.exists() and (ROOT / "models" / "tiny-target").is_dir() else None


def vllm_accepts(cases: dict[str, tuple[list[str], bool]], timeout: float = 540) -> dict[str, dict]:
    """Run vLLM's parser on each case's server arguments (and build its engine config where the case says so,
    no weights loaded): per case ``ok``, ``host``, ``port``, ``force_usage`` and, with the engine, the
    per-request metrics mode and the speculative method; or ``ok: False`` and vLLM's error."""
    python = vllm_python()
    assert python is not None, "vLLM's virtualenv (make vllm) or models/ missing"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([str(python), "-c", VLLM_CHECK, json.dumps(cases)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line, proc.stderr[-3000:]
    return json.loads(line.removeprefix("RESULTS "))
