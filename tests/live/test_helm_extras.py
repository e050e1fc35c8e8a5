"""The chart's basics beyond the pod (helm 3.17, ``make k8s-tools``): the ``helm test`` hook, rendered and its
command run for real against a local sidecar (no cluster here); the PodDisruptionBudget; extra containers,
init containers, envFrom and the HF token; topology spread; extraObjects; one monitoring.labels value on
every monitoring object. Every example values file and these extras validate in tests/live/test_helm.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fakes import ReplayVllm, SidecarProcess, free_port, wait_for
from manifests import helm_template

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specdec-sidecar"
HELM = str(ROOT / ".tools" / "bin" / "helm")
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "AlertmanagerConfig"}

pytestmark = pytest.mark.skipif(not Path(HELM).is_file(), reason="helm not installed: run `make k8s-tools`")


def docs(*args: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(helm_template(*args).stdout) if d]


def only(found: list[dict], kind: str) -> dict:
    [doc] = [d for d in found if d["kind"] == kind]
    return doc


def hook_pod(*args: str) -> dict:
    [pod] = [d for d in docs(*args) if d["kind"] == "Pod"]
    return pod


# ---------------------------------------------------------------- helm test


def test_helm_test_hook_is_a_hardened_test_pod():
    import kubernetes_validate

    pod = hook_pod()
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "hook-succeeded" in pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    kubernetes_validate.validate(pod, "1.30.0", strict=True)
    [ask] = pod["spec"]["containers"]
    assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["automountServiceAccountToken"] is False
    assert ask["securityContext"]["runAsNonRoot"] is True and ask["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in ask["env"]}
    # through the Service, by its name and ports
    assert env == {
        "SPECDEC_SIDECAR_URL": "http://rel-specdec-sidecar:9464",
        "SPECDEC_VLLM_METRICS_URL": "http://rel-specdec-sidecar:8000/metrics",
    }
    assert ask["image"] == only(docs(), "Deployment")["spec"]["template"]["spec"]["initContainers"][0]["image"]
    off = [d for d in docs("--set", "helmTest.enabled=false") if d["kind"] == "Pod"]
    assert off == []
    no_vllm = hook_pod("--set", "monitoring.vllmMetrics.enabled=false")["spec"]["containers"][0]["env"]
    assert [e["name"] for e in no_vllm] == ["SPECDEC_SIDECAR_URL"]


async def _run_hook(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    # the pod's python3 is the image's; here the interpreter running the tests
    argv = [sys.executable if command[0] == "python3" else command[0], *command[1:]]
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


@pytest.mark.timeout(120)
async def test_helm_test_command_against_a_local_sidecar():
    """The hook's command and arguments, run as rendered with the Service URLs pointed at a local sidecar in
    front of a replaying vLLM: 0 when ready; non-zero, naming /readyz, when vLLM is gone."""
    [ask] = hook_pod()["spec"]["containers"]
    command = [*ask["command"], *ask["args"]]
    upstream = ReplayVllm()
    await upstream.start()
    sidecar = SidecarProcess(upstream=upstream.url).start()
    try:
        env = {
            "SPECDEC_SIDECAR_URL": f"http://127.0.0.1:{sidecar.metrics_port}",
            "SPECDEC_VLLM_METRICS_URL": f"http://127.0.0.1:{sidecar.proxy_port}/metrics",
        }

        async def ready() -> bool:
            code, _ = await _run_hook(command, env)
            return code == 0

        await wait_for(ready, timeout=30, what="the hook to pass against a ready sidecar")
        code, out = await _run_hook(command, env)
        assert code == 0 and out.startswith("ok: ") and "has vLLM's series" in out, out
        # vLLM's metrics URL that answers something else: the check fails and says which URL
        code, out = await _run_hook(command, {**env, "SPECDEC_VLLM_METRICS_URL": f"http://127.0.0.1:{sidecar.metrics_port}/healthz"})
        assert code != 0 and "without vllm:* series" in out, out
        # vLLM goes away: after the sidecar's next polls /readyz answers 503 and the test pod fails
        await upstream.stop()

        async def not_ready() -> bool:
            code, out = await _run_hook(command, env)
            return code != 0 and "/readyz answered 503" in out

        await wait_for(not_ready, timeout=30, what="the hook to fail once vLLM is gone")
    finally:
        sidecar.stop()
        await upstream.stop()
    # nothing listening at all
    code, out = await _run_hook(command, {"SPECDEC_SIDECAR_URL": f"http://127.0.0.1:{free_port()}"})
    assert code != 0 and "/readyz answered None" in out, out


# ---------------------------------------------------------------- PodDisruptionBudget


def test_pod_disruption_budget():
    assert not [d for d in docs() if d["kind"] == "PodDisruptionBudget"]
    pdb = only(docs("--set", "podDisruptionBudget.enabled=true"), "PodDisruptionBudget")
    deployment = only(docs("--set", "podDisruptionBudget.enabled=true"), "Deployment")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    pdb = only(
        docs("--set", "podDisruptionBudget.enabled=true", "--set", "podDisruptionBudget.maxUnavailable=null",
             "--set-string", "podDisruptionBudget.minAvailable=50%"),
        "PodDisruptionBudget",
    )  # fmt: skip
    assert pdb["spec"]["minAvailable"] == "50%" and "maxUnavailable" not in pdb["spec"]
    both = helm_template(
        "--set", "podDisruptionBudget.enabled=true", "--set", "podDisruptionBudget.minAvailable=1", check=False
    )
    assert both.returncode != 0 and "minAvailable or maxUnavailable, not both" in both.stderr
    bad = helm_template("--set-string", "podDisruptionBudget.maxUnavailable=half", check=False)
    assert bad.returncode != 0 and "maxUnavailable" in bad.stderr
    assert not [d for d in docs("--set", "podDisruptionBudget.enabled=true", "--set", "monitoringOnly=true") if d["kind"] == "PodDisruptionBudget"]


# ---------------------------------------------------------------- the pod's extras


def test_extra_containers_env_from_hf_token_and_topology_spread():
    found = docs("-f", str(CHART / "ci" / "all-toggles-values.yaml"))
    spec = only(found, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["model-ready"]
    assert [c["name"] for c in spec["containers"]] == ["vllm", "specdec-sidecar", "log-shipper"]
    vllm, sidecar = spec["containers"][0], spec["containers"][1]
    assert vllm["envFrom"] == [{"configMapRef": {"name": "vllm-env", "optional": True}}]
    assert sidecar["envFrom"] == [{"secretRef": {"name": "specdec-sidecar-env", "optional": True}}]
    [token] = [e for e in vllm["env"] if e["name"] == "HF_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    [spread] = spec["topologySpreadConstraints"]
    # no labelSelector given: this release's pods
    assert spread["labelSelector"]["matchLabels"] == only(found, "Deployment")["spec"]["selector"]["matchLabels"]
    # native sidecar: extra init containers run before it, it stays an init container with restartPolicy Always
    native = only(docs("--set-json", 'extraInitContainers=[{"name": "fetch", "image": "busybox:1.36"}]'), "Deployment")
    assert [c["name"] for c in native["spec"]["template"]["spec"]["initContainers"]] == ["fetch", "specdec-sidecar"]
    given = only(
        docs("--set-json", 'topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "x"}}}]'),
        "Deployment",
    )
    assert given["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["labelSelector"] == {"matchLabels": {"app": "x"}}


def test_extra_objects_go_through_tpl():
    found = docs(
        "--set-json",
        'extraObjects=[{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "{{ .Release.Name }}-hf"}, "stringData": {"token": "x"}}]',
        "--set-json",
        'extraObjects[1]="apiVersion: v1\\nkind: ConfigMap\\nmetadata:\\n  name: {{ include \\"specdec-sidecar.fullname\\" . }}-extra\\n"',
    )
    assert only(found, "Secret")["metadata"]["name"] == "rel-hf"
    assert {d["metadata"]["name"] for d in found if d["kind"] == "ConfigMap"} == {"rel-specdec-sidecar-extra"}


# ---------------------------------------------------------------- monitoring.labels


def test_monitoring_labels_on_every_monitoring_object():
    found = docs(
        "-f", str(CHART / "ci" / "all-toggles-values.yaml"),
        "--set", "monitoring.labels.release=prom-a", "--set", "monitoring.labels.tier=ml",
        "--set", "prometheusRule.additionalLabels.release=prom-b",
    )  # fmt: skip
    monitoring = [d for d in found if d["kind"] in MONITORING_KINDS or "grafana_dashboard" in d["metadata"].get("labels", {})]
    assert {d["kind"] for d in monitoring} == {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig", "ConfigMap"}
    for doc in monitoring:
        labels = doc["metadata"]["labels"]
        assert labels["tier"] == "ml", doc["kind"]
        # an object's own additionalLabels win over the shared value
        assert labels["release"] == ("prom-b" if doc["kind"] == "PrometheusRule" else "prom-a"), doc["kind"]
    # not on the workload
    assert "tier" not in only(found, "Deployment")["metadata"]["labels"]
    pod_monitor = only(docs("--set", "podMonitor.enabled=true", "--set", "monitoring.labels.release=prom-a"), "PodMonitor")
    assert pod_monitor["metadata"]["labels"]["release"] == "prom-a"


# ---------------------------------------------------------------- NOTES.txt


def notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it (helm template does not): rendered through a throw-away
    template in a copy of the chart."""
    import shutil

    chart = tmp_path / "chart"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "notes.txt")
        (chart / "templates" / "zz-notes.yaml").write_text(
            'kind: Notes\nnotes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n'
        )
    out = subprocess.run(
        [HELM, "template", "rel", str(chart), "--namespace", "llm", "--show-only", "templates/zz-notes.yaml", *args],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    return yaml.safe_load(out)["notes"]


def test_notes_say_which_values_the_pods_need(tmp_path):
    text = notes(tmp_path)
    todo = text.split("BEFORE THE PODS CAN START")[1].split("Deployed:")[0]
    for value in ("sidecar.image.repository", "vllm.model", "vllm.hfTokenSecret.name", "vllm.gpu.count"):
        assert f"  - {value}:" in todo, value
    assert "Deployed: Deployment rel-specdec-sidecar (1 pod), Service rel-specdec-sidecar." in text
    assert "specdec-sidecar top --url http://127.0.0.1:9464/metrics" in text and "status page" in text
    assert "helm test rel -n llm" in text
    # the GPU example sets all of them but the model, which it names on purpose
    gpu = notes(tmp_path, "-f", str(CHART / "ci" / "gpu-values.yaml"))
    assert "sidecar.image.repository:" not in gpu and "vllm.hfTokenSecret" not in gpu and "vllm.gpu.count:" not in gpu
    assert "on 1 GPU" in gpu and "PodDisruptionBudget rel-specdec-sidecar" in gpu
    ready = notes(
        tmp_path, "-f", str(CHART / "ci" / "gpu-values.yaml"), "--set", "vllm.model=Qwen/Qwen3-8B",
    )
    assert "BEFORE THE PODS CAN START" not in ready and "serving Qwen/Qwen3-8B on 1 GPU" in ready
    # a model from a mounted path needs no token
    local = notes(tmp_path, "--set", "vllm.model=/models/target")
    assert "vllm.hfTokenSecret" not in local
    # monitoring only: nothing about pods
    assert "BEFORE THE PODS" not in notes(tmp_path, "-f", str(CHART / "ci" / "monitoring-only-values.yaml"))


def test_service_and_pod_monitor_together_fail_and_no_example_enables_both():
    both = helm_template("--set", "serviceMonitor.enabled=true", "--set", "podMonitor.enabled=true", check=False)
    assert both.returncode != 0
    assert "serviceMonitor.enabled and podMonitor.enabled both scrape the same endpoints" in both.stderr
    for path in sorted((CHART / "ci").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        enabled = [k for k in ("serviceMonitor", "podMonitor") if (values.get(k) or {}).get("enabled")]
        assert len(enabled) <= 1, f"{path.name} enables {enabled}"
        helm_template("-f", str(path))  # and every example renders
