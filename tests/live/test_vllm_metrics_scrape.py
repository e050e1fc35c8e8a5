"""vLLM's own /metrics stays scrapable with port takeover: a real Prometheus (Debian's) scrapes a sidecar in
front of a real vLLM (CPU build, tiny target, n-gram speculation) with exactly the endpoints the chart's
rendered ServiceMonitor, or PodMonitor, describes, translated to static scrape configs (named ports resolved
as the operator would: Service port -> container port -> the local process's port; relabelings copied). Both
the sidecar's series (job specdec-sidecar) and vLLM's (job vllm, through the sidecar's proxy port, which
passes GET /metrics on to vLLM) arrive, each series once. The control: both monitors at once (which the chart
refuses to render) scrape every series twice.

Heavy (starts vLLM): run it alone, ``flock /tmp/heavy.lock .venv/bin/python -m pytest tests/live/test_vllm_metrics_scrape.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from fakes import SidecarProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specdec-sidecar"
HELM = str(ROOT / ".tools" / "bin" / "helm")
PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.skipif(not Path(HELM).is_file(), reason="helm not installed: run `make k8s-tools`"),
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (make system-deps)"),
]


def render(*args: str) -> list[dict]:
    out = subprocess.run(
        [HELM, "template", "rel", str(CHART), "--namespace", "llm", "--kube-version", "1.30.0",
         "-f", str(CHART / "ci" / "all-toggles-values.yaml"), *args],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


def only(docs: list[dict], kind: str) -> dict:
    [found] = [d for d in docs if d["kind"] == kind]
    return found


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", lambda m: "_" + m.group(1).lower(), key)


def scrape_configs(monitor: dict, service: dict, local_ports: dict[str, int]) -> list[dict]:
    """The monitor's endpoints as Prometheus scrape configs against this machine: a ServiceMonitor's port is
    a Service port name, resolved through its targetPort to a container port name; a PodMonitor's port is the
    container port name. ``local_ports`` maps container port names to the local process's ports. The scrape
    interval is 1s instead of the rendered one, so the test does not wait minutes."""
    endpoints = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
    configs = []
    for i, endpoint in enumerate(endpoints):
        port = endpoint["port"]
        if monitor["kind"] == "ServiceMonitor":
            [service_port] = [p for p in service["spec"]["ports"] if p["name"] == port]
            port = service_port["targetPort"]
        configs.append(
            {
                "job_name": f"{monitor['kind']}-{i}",
                "metrics_path": endpoint.get("path", "/metrics"),
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                # what Kubernetes service discovery gives the relabelings to read, and the target labels the
                # operator's generated config adds (endpoint; service for a ServiceMonitor; pod, container)
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{local_ports[port]}"],
                        "labels": {
                            "__meta_kubernetes_namespace": "llm",
                            "endpoint": endpoint["port"],
                            "pod": "rel-specdec-sidecar-0",
                            "container": "specdec-sidecar",
                            **({"service": service["metadata"]["name"]} if monitor["kind"] == "ServiceMonitor" else {}),
                        },
                    }
                ],
                "relabel_configs": [{_snake(k): v for k, v in r.items()} for r in endpoint.get("relabelings", [])],
            }
        )
    return configs


class Prometheus:
    def __init__(self, workdir: Path, configs: list[dict]):
        self.workdir = workdir
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": configs}))
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "ab"),
        )  # fmt: skip

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]["result"]

    def wait_for(self, expr: str, n: int, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.workdir / "prometheus.log").read_text()[-2000:]
            try:
                result = self.query(expr)
                if len(result) >= n:
                    return result
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{expr}: {result} after {timeout}s; log: {(self.workdir / 'prometheus.log').read_text()[-1500:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    """A real vLLM on loopback with the sidecar in front, as in the chart's pod: proxy and metrics ports."""
    from devstack.vllm_server import REPO, VllmServer, ngram_config, vllm_python

    if not vllm_python().exists():
        pytest.fail(f"vLLM is not installed at {vllm_python()} (run `make vllm`)")
    log = Path(tmp_path_factory.mktemp("vllm")) / "vllm.log"
    with VllmServer(model=REPO / "models" / "tiny-target", speculative=ngram_config(4), log_path=log, startup_timeout=400) as vllm:
        sidecar = SidecarProcess(upstream=vllm.url).start()
        try:
            body = json.dumps({"model": "tiny-target", "prompt": "def add(a, b): return a + b\n" * 3, "max_tokens": 16, "temperature": 0})
            request = urllib.request.Request(f"http://127.0.0.1:{sidecar.proxy_port}/v1/completions", body.encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                assert response.status == 200
            yield sidecar
        finally:
            sidecar.stop()


def _ports(sidecar) -> dict[str, int]:
    # container port names of the chart's sidecar -> the local sidecar's ports
    return {"http": sidecar.proxy_port, "specdec-metrics": sidecar.metrics_port}


def _duplicates(prometheus: Prometheus, prefix: str) -> list[dict]:
    """Series (ignoring the labels that tell targets apart: job, instance, service, endpoint) that arrive from more than one target. Aggregation drops
    __name__, so it is copied into a label first."""
    return prometheus.query(
        f'count without (job, instance, service, endpoint) (label_replace({{__name__=~"{prefix}.+"}}, "name", "$1", "__name__", "(.+)")) > 1'
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_sidecar_and_vllm_series_arrive_once_each(pod, kind, tmp_path):
    flip = ["--set", "serviceMonitor.enabled=false", "--set", "podMonitor.enabled=true"] if kind == "PodMonitor" else []
    docs = render(*flip)
    monitor = only(docs, kind)
    configs = scrape_configs(monitor, only(docs, "Service"), _ports(pod))
    assert len(configs) == 2  # the sidecar's metrics port, and vLLM's through the proxy port
    prometheus = Prometheus(tmp_path / "prometheus", configs)
    try:
        up = prometheus.wait_for("up == 1", 2)
        assert sorted(r["metric"]["job"] for r in up) == ["specdec-sidecar", "vllm"]
        assert {r["metric"]["namespace"] for r in up} == {"llm"}
        # vLLM's own series, only under job vllm; the sidecar's, only under job specdec-sidecar
        vllm_jobs = prometheus.wait_for('count by (job) ({__name__=~"vllm:.+"})', 1)
        sidecar_jobs = prometheus.wait_for('count by (job) ({__name__=~"specdec_.+"})', 1)
        time.sleep(3)  # a few more scrapes of both targets
        assert [r["metric"] for r in prometheus.query('count by (job) ({__name__=~"vllm:.+"})')] == [{"job": "vllm"}]
        assert [r["metric"] for r in prometheus.query('count by (job) ({__name__=~"specdec_.+"})')] == [{"job": "specdec-sidecar"}]
        assert int(vllm_jobs[0]["value"][1]) > 20 and int(sidecar_jobs[0]["value"][1]) > 5
        # once each: no series from two targets; one vLLM engine, one sidecar
        assert _duplicates(prometheus, "vllm:") == [] and _duplicates(prometheus, "specdec_") == []
        [engine] = prometheus.query("vllm:cache_config_info")
        assert engine["metric"]["job"] == "vllm" and engine["metric"]["namespace"] == "llm"
        [upstream] = prometheus.query("specdec_upstream_up")
        assert upstream["value"][1] == "1" and upstream["metric"]["job"] == "specdec-sidecar"
        # the request sent through the proxy is in vLLM's own counters, read through the proxy
        [served] = prometheus.query('sum(vllm:request_success_total{model_name="tiny-target"})')
        assert float(served["value"][1]) >= 1
        print(f"{kind}: {vllm_jobs[0]['value'][1]} vllm:* series under job vllm, {sidecar_jobs[0]['value'][1]} specdec_* series under job specdec-sidecar, none twice")
    finally:
        prometheus.stop()


@pytest.mark.timeout(600)
def test_both_monitors_at_once_scrape_everything_twice(pod, tmp_path):
    """Why the chart refuses a ServiceMonitor and a PodMonitor together: the same endpoints, scraped twice."""
    proc = subprocess.run(
        [HELM, "template", "rel", str(CHART), "--set", "serviceMonitor.enabled=true", "--set", "podMonitor.enabled=true"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "serviceMonitor.enabled and podMonitor.enabled" in proc.stderr
    sm_docs = render()
    pm_docs = render("--set", "serviceMonitor.enabled=false", "--set", "podMonitor.enabled=true")
    service = only(sm_docs, "Service")
    configs = scrape_configs(only(sm_docs, "ServiceMonitor"), service, _ports(pod)) + scrape_configs(
        only(pm_docs, "PodMonitor"), service, _ports(pod)
    )
    prometheus = Prometheus(tmp_path / "prometheus", configs)
    try:
        prometheus.wait_for("up == 1", 4)
        prometheus.wait_for('count by (job) ({__name__=~"vllm:.+"})', 1)
        time.sleep(2)
        assert _duplicates(prometheus, "vllm:") and _duplicates(prometheus, "specdec_")
    finally:
        prometheus.stop()
