"""``specdec-sidecar inject`` with the real tools: as a Helm post-renderer (helm 3.17, the installed
``specdec-sidecar`` entry point), after ``kubectl kustomize`` on deploy/kustomize (and through the Argo CD
plugin's own command), and vLLM 0.32's own argument parser and engine-config validation on every vLLM command
inject writes. With SPECDEC_PRODUCTION_STACK_CHART pointing at a copy of vllm-project/production-stack's
``helm/`` directory (its optional kube-prometheus-stack/prometheus-adapter dependencies removed from
Chart.yaml, no Chart.lock), its real chart is rendered with speculation configured through inject as a
post-renderer and checked: the router's pod-IP discovery and the engine Service reach the sidecar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from manifests import container, docs, owner_of, vllm_accepts, vllm_python

from sidecar.commands import inject
from sidecar.commands.inject_shell import find_server, server_args_start, shell_script_index

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "bin"
HELM = os.environ.get("HELM") or str(TOOLS / "helm")
KUBECTL = os.environ.get("KUBECTL") or str(TOOLS / "kubectl")
CHART = ROOT / "helm" / "specdec-sidecar"
FIXTURES = ROOT / "tests" / "fixtures" / "inject"
OVERLAY = ROOT / "deploy" / "kustomize" / "overlays" / "production"
ENTRY = Path(sys.executable).parent / "specdec-sidecar"
KUBE_VERSION = "1.30.0"

pytestmark = pytest.mark.skipif(
    not (Path(HELM).is_file() and Path(KUBECTL).is_file() and ENTRY.is_file()),
    reason="helm/kubectl (make k8s-tools) or the specdec-sidecar entry point (pip install .) missing",
)


def run(cmd: list[str], *, stdin: str | None = None, cwd: Path | None = None, env=None) -> str:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd, env=env,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def pod_specs(objects: list[dict]):
    for obj in objects:
        for template in inject.templates(obj):
            yield obj, inject._get(obj, template.spec)


def vllm_server_args(objects: list[dict]) -> dict[str, list[str]]:
    """Every vLLM server's arguments in *objects* (as vLLM's parser takes them), by object and container."""
    found = {}
    for obj, spec in pod_specs(objects):
        for c in spec["containers"]:
            argv = (c.get("command") or []) + (c.get("args") or [])
            at = shell_script_index(argv)
            if at is not None:
                server = find_server(argv[at])
                if server is None:
                    continue
                args = [w.value for w in server.args]
                words = [w.value for w in server.all_words]
            else:
                start = server_args_start(argv)
                if start is None and not c.get("command") and "vllm-openai" in c.get("image", ""):
                    start = 0
                if start is None:
                    continue
                args, words = argv[start:], argv
            if "serve" in words and args and not args[0].startswith("-"):
                args = ["--model", *args]  # `vllm serve MODEL`: the positional is the model
            found[f"{inject._describe(obj)}/{c['name']}"] = args
    return found


# ---------------------------------------------------------------- Helm post-renderer


def helm_template(chart: Path, *args: str) -> str:
    return run([HELM, "template", "rel", str(chart), "--namespace", "llm", "--kube-version", KUBE_VERSION, *args])


def test_post_renderer_leaves_this_projects_chart_alone():
    """The chart already runs the sidecar (port takeover included): inject as its post-renderer changes nothing."""
    plain = helm_template(CHART)
    rendered = helm_template(CHART, "--post-renderer", str(ENTRY), "--post-renderer-args", "inject")
    assert docs(rendered) == docs(plain)


def test_post_renderer_injects_a_charts_output(tmp_path):
    chart = tmp_path / "engine"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: engine\nversion: 0.1.0\n")
    (chart / "templates" / "engine.yaml").write_text((FIXTURES / "production-stack-engine.yaml").read_text())
    plain = helm_template(chart)
    rendered = helm_template(chart, "--post-renderer", str(ENTRY), "--post-renderer-args", "inject",
                             "--post-renderer-args", "--vllm-port=8101")  # fmt: skip
    expected = run([str(ENTRY), "inject", "--vllm-port=8101"], stdin=plain)
    assert docs(rendered) == docs(expected) != docs(plain)


# ---------------------------------------------------------------- kustomize


def test_kustomize_overlay_through_inject(tmp_path):
    import kubernetes_validate

    built = run([KUBECTL, "kustomize", str(OVERLAY)])
    out = run([str(ENTRY), "inject"], stdin=built)
    objects = docs(out)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    service = next(o for o in objects if o["kind"] == "Service")
    assert deployment["metadata"]["namespace"] == service["metadata"]["namespace"] == "llm"
    spec = deployment["spec"]["template"]["spec"]
    assert owner_of(spec, service["spec"]["ports"][0]["targetPort"]) == inject.SIDECAR_NAME
    args = container(spec, inject.SIDECAR_NAME)["args"]
    assert args[-2:] == ["--scrape-interval=5s", "--default-temperature=1.0"]  # the overlay's annotation
    assert docs(run([str(ENTRY), "inject", "--uninject"], stdin=out)) == docs(built)
    assert run([str(ENTRY), "inject"], stdin=out) == out

    # the Argo CD plugin's generate command, with a `kustomize` that is kubectl's
    plugin = yaml.safe_load((ROOT / "deploy" / "kustomize" / "argocd-cmp-plugin.yaml").read_text())
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "kustomize").write_text(f'#!/bin/sh\n[ "$1" = build ] && shift\nexec {KUBECTL} kustomize "$@"\n')
    (shim / "kustomize").chmod(0o755)
    (shim / "specdec-sidecar").symlink_to(ENTRY)
    generate = plugin["spec"]["generate"]
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    assert run([*generate["command"], *generate["args"]], cwd=OVERLAY, env=env) == out
    assert (OVERLAY / plugin["spec"]["discover"]["fileName"]).is_file()


# ---------------------------------------------------------------- vLLM's own parser

def local_models(args: list[str]) -> list[str]:
    """The same arguments for this machine's engine-config check: the model is the embedded tiny target, a
    draft-based speculative config uses the tiny draft, KServe's {{.Name}} is filled in, and what needs
    hardware this machine lacks (tensor/pipeline parallelism) or a longer context than the tiny target's
    drops out; everything inject wrote stays."""
    dropped = {"--tensor-parallel-size", "--pipeline-parallel-size", "--max-model-len"}
    out: list[str] = []
    i = 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        flag = key.replace("_", "-")
        if flag not in dropped | {"--model", "--speculative-config", "--served-model-name"}:
            out.append(args[i])
            i += 1
            continue
        if not eq:
            value = args[i + 1]
            i += 1
        i += 1
        if flag == "--model":
            out += ["--model", str(ROOT / "models" / "tiny-target")]
        elif flag == "--speculative-config":
            config = json.loads(value)
            if "model" in config:
                config.update(method="draft_model", model=str(ROOT / "models" / "tiny-draft"))
            out += ["--speculative-config", json.dumps(config)]
        elif flag == "--served-model-name":
            out += ["--served-model-name", value.replace("{{.Name}}", "llama3")]
    return out


def production_stack_objects(post_renderer: bool) -> list[dict]:
    chart = Path(os.environ["SPECDEC_PRODUCTION_STACK_CHART"])
    values = {"servingEngineSpec": {"modelSpec": [{
        "name": "llama3", "repository": "vllm/vllm-openai", "tag": "v0.32.0",
        "modelURL": "meta-llama/Llama-3.1-8B-Instruct", "replicaCount": 2,
        "requestCPU": 4, "requestMemory": "16Gi", "requestGPU": 1,
        "vllmConfig": {"maxModelLen": 4096, "extraArgs": [
            "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}']},
    }]}}  # fmt: skip
    extra = ["--post-renderer", str(ENTRY), "--post-renderer-args", "inject"] if post_renderer else []
    return docs(helm_template(chart, "--set-json", f"servingEngineSpec={json.dumps(values['servingEngineSpec'])}",
                              *extra))  # fmt: skip


def inject_cases() -> dict[str, list[dict]]:
    cases = {p.stem: docs(run([str(ENTRY), "inject", "--filename", str(p)])) for p in sorted(FIXTURES.glob("*.yaml"))}
    cases["kustomize"] = docs(run([str(ENTRY), "inject"], stdin=run([KUBECTL, "kustomize", str(OVERLAY)])))
    if os.environ.get("SPECDEC_PRODUCTION_STACK_CHART"):
        cases["production-stack"] = production_stack_objects(post_renderer=True)
    return cases


@pytest.mark.timeout(600)
@pytest.mark.skipif(vllm_python() is None, reason="vLLM's virtualenv (make vllm) or models/ missing")
def test_vllm_accepts_every_injected_command():
    """vLLM 0.32's parser (and, for the single-GPU shapes, its engine config) takes every server command inject
    wrote: host 127.0.0.1, the loopback port the sidecar's --upstream names, the two per-request flags."""
    cases = {}
    sidecar_upstreams = {}
    for shape, objects in inject_cases().items():
        for name, args in vllm_server_args(objects).items():
            cases[f"{shape}: {name}"] = (local_models(args), True)
        for obj, spec in pod_specs(objects):
            every = (spec.get("initContainers") or []) + spec["containers"]
            for c in every:
                if c["name"] == inject.SIDECAR_NAME:
                    sidecar_upstreams[inject._describe(obj)] = c["args"][1]
    # KServe runs the runtime's container with the InferenceService's model args appended
    objects = docs(run([str(ENTRY), "inject", "--filename", str(FIXTURES / "kserve-vllm.yaml")]))
    runtime = cases["kserve-vllm: ServingRuntime models/vllm-openai/kserve-container"][0]
    isvc = next(o for o in objects if o["metadata"]["name"] == "llama3")
    cases["kserve-vllm: InferenceService models/llama3 on vllm-openai/kserve-container"] = (
        local_models(runtime + isvc["spec"]["predictor"]["model"]["args"]), True)
    sidecar_upstreams["InferenceService models/llama3 on vllm-openai"] = sidecar_upstreams["ServingRuntime models/vllm-openai"]
    # kserve (runtime + two InferenceServices), production-stack engine, llm-d, LeaderWorkerSet, kustomize;
    # production-stack's real chart adds its engine when it is present
    expected = 7 + (1 if os.environ.get("SPECDEC_PRODUCTION_STACK_CHART") else 0)
    assert len(cases) == expected, sorted(cases)
    results = vllm_accepts(cases)
    for name, result in results.items():
        assert result["ok"], f"{name}: {result}"
        assert result["host"] == "127.0.0.1" and result["force_usage"] is True, name
        workload = name.split(": ", 1)[1].rsplit("/", 1)[0]
        assert sidecar_upstreams[workload] == f"--upstream=http://127.0.0.1:{result['port']}", name
        speculative = any(a.split("=")[0] == "--speculative-config" for a in cases[name][0])
        assert (result["spec"] is not None) is speculative, name
        if speculative:  # the per-request flag wherever speculation is configured, and vLLM takes the pair
            assert result["per_request"] == "summary" and result["spec"] in ("ngram", "draft_model"), name


# ---------------------------------------------------------------- production-stack's real chart


@pytest.mark.skipif(not os.environ.get("SPECDEC_PRODUCTION_STACK_CHART"),
                    reason="SPECDEC_PRODUCTION_STACK_CHART does not point at a copy of production-stack's helm/")
def test_production_stack_chart_router_and_service_reach_the_sidecar():
    import kubernetes_validate

    plain, objects = production_stack_objects(False), production_stack_objects(True)
    assert len(plain) == len(objects)
    changed = [inject._describe(b) for a, b in zip(plain, objects, strict=True) if a != b]
    engine = next(o for o in objects if o["kind"] == "Deployment" and
                  any(c["name"] == "vllm" for c in o["spec"]["template"]["spec"]["containers"]))  # fmt: skip
    assert changed == [inject._describe(engine)]  # only the engine Deployment changes
    spec = engine["spec"]["template"]["spec"]
    labels = engine["spec"]["template"]["metadata"]["labels"]
    # the engine Service selects these pods and targets a port only the sidecar declares
    service = next(o for o in objects if o["kind"] == "Service" and o["spec"].get("selector", {}).items() <= labels.items()
                   and o["spec"]["selector"])  # fmt: skip
    target = next(p["targetPort"] for p in service["spec"]["ports"] if p["targetPort"] == "container-port")
    assert owner_of(spec, target) == inject.SIDECAR_NAME
    # the router discovers pods by label and dials pod-IP:--k8s-port (default 8000): the sidecar's port
    router = next(o for o in objects if o["kind"] == "Deployment" and o is not engine)
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--k8s-service-discovery-type") + 1] == "pod-ip"
    port = int(args[args.index("--k8s-port") + 1]) if "--k8s-port" in args else 8000
    assert owner_of(spec, port) == inject.SIDECAR_NAME
    selector = dict(kv.split("=") for kv in args[args.index("--k8s-label-selector") + 1].split(","))
    assert selector.items() <= labels.items()
    vllm = container(spec, "vllm")
    flags = vllm["command"]
    assert flags[flags.index("--host") + 1] == "127.0.0.1" and flags[flags.index("--port") + 1] == "8001"
    assert "--per-request-spec-decode-metrics" in flags and container(spec, inject.SIDECAR_NAME)["restartPolicy"] == "Always"
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    # and out again
    out = run([str(ENTRY), "inject", "--uninject"], stdin=yaml.safe_dump_all(objects, sort_keys=False))
    assert docs(out) == plain


def test_entry_point_writes_nothing_on_bad_yaml():
    proc = subprocess.run([str(ENTRY), "inject"], input="kind: [\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("specdec-sidecar inject: <stdin>:") and "not valid YAML" in proc.stderr
