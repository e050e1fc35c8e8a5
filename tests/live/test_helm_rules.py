"""The chart's PrometheusRule follows the release's values: rendered with helm 3.17 (``make k8s-tools``) and
non-default values, the rules are extracted from the PrometheusRule and run through ``promtool check rules``
and ``promtool test rules`` cases that hold only at the values given (another guard, another fallback
break-even, another ``for:`` and severity, extra labels, a runbook base URL, a cluster label that keeps two
clusters apart, one alert disabled, recording rules left to another release). The example values files in
ci/ are checked for agreement between the sidecar's flags and the rules.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from manifests import helm_template

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specdec-sidecar"
HELM = str(ROOT / ".tools" / "bin" / "helm")
PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.skipif(not Path(HELM).is_file(), reason="helm not installed: run `make k8s-tools`"),
    pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make system-deps)"),
]

# The chart's copies of alerts/*.yaml (`make chart`; tests/live/test_helm.py checks they equal alerts/).
SOURCE_GROUPS = [
    g for p in sorted((CHART / "files" / "rules").glob("*.yaml")) for g in yaml.safe_load(p.read_text())["groups"]
]

# Non-default values: everything item by item differs from alerts/ and from values.yaml.
CUSTOM = {
    "prometheusRule": {
        "enabled": True,
        "thresholds": {"draft_tokens_guard": 5},
        "clusterLabel": "cluster",
        "runbookBaseUrl": "https://wiki.example.com/specdec/runbooks",
        "additionalRuleLabels": {"env": "prod"},
        "alerts": {
            "SpecDecodeAcceptanceBelowBreakEven": {
                "severity": "warning",
                "for": "2m",
                "additionalRuleLabels": {"team": "inference"},
            },
            "SpecDecodeNearBreakEven": {"enabled": False},
        },
    },
    # the fallback break-even for pods that export none follows the sidecar's own flag
    "sidecar": {"settings": {"breakEven": 0.3, "nearBreakEvenUpper": 0.4}},
}


def rendered_rule(tmp_path: Path, values: dict | None, *args: str) -> dict:
    extra = list(args)
    if values is not None:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        extra = ["-f", str(values_file), *extra]
    docs = [d for d in yaml.safe_load_all(helm_template(*extra).stdout) if d]
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    return rule


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def rules_by_name(groups: list[dict]) -> dict[str, dict]:
    return {r.get("alert") or r["record"]: r for g in groups for r in g["rules"]}


def series(name: str, labels: dict, values: str) -> dict:
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def pod(cluster: str, model: str, drafts_per_min: int, accepted_per_min: int, break_even: float | None = None):
    """Counters of one sidecar (job specdec-sidecar) for *model*, over 30 minutes at 1m steps."""
    labels = {"job": "specdec-sidecar", "instance": f"{cluster}-{model}:9464", "namespace": "ml", "model": model}
    if cluster:
        labels["cluster"] = cluster
    out = [
        series("specdec_draft_tokens_total", labels, f"0+{drafts_per_min}x30"),
        series("specdec_accepted_tokens_total", labels, f"0+{accepted_per_min}x30"),
        series("specdec_drafts_total", labels, f"0+{max(drafts_per_min // 4, 1)}x30"),
    ]
    if break_even is not None:
        out.append(series("specdec_break_even_acceptance_rate", labels, f"{break_even}x30"))
    return out


def below_break_even(model: str, accepts: str, break_even: str, labels: dict, runbook: str) -> dict:
    return {
        "exp_labels": {"namespace": "ml", "model": model, **labels},
        "exp_annotations": {
            "summary": "Speculative decoding accepts too few draft tokens to pay for itself.",
            "description": (
                f"Model {model} in ml accepts {accepts} of draft tokens over 5m, below its break-even of "
                f"{break_even}: the draft's verify work now costs more latency than it saves. Turn speculation "
                "off for this workload or fix the draft."
            ),
            "runbook_url": runbook,
        },
    }


def run_promtool_tests(tmp_path: Path, groups: list[dict], tests: list[dict]) -> None:
    rules_file = tmp_path / "rendered-rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}))
    check = promtool("check", "rules", rules_file.name, cwd=tmp_path)
    n_rules = sum(len(g["rules"]) for g in groups)
    assert check.returncode == 0 and f"SUCCESS: {n_rules} rules found" in check.stdout, check.stdout + check.stderr
    test_file = tmp_path / "rendered-test.yaml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [rules_file.name],
                "evaluation_interval": "1m",
                "group_eval_order": [g["name"] for g in groups],
                "tests": tests,
            },
            sort_keys=False,
            width=10_000,
        )
    )
    proc = promtool("test", "rules", test_file.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rendered_rules_alert_at_the_values_given(tmp_path):
    groups = rendered_rule(tmp_path, CUSTOM)["spec"]["groups"]
    rules = rules_by_name(groups)
    source = rules_by_name(SOURCE_GROUPS)
    assert "SpecDecodeNearBreakEven" not in rules and set(source) - set(rules) == {"SpecDecodeNearBreakEven"}
    assert rules["specdec:draft_tokens_guard:threshold"]["expr"] == "vector(5)"
    assert rules["specdec:acceptance_break_even:threshold"]["expr"] == "vector(0.3)"
    assert rules["specdec:acceptance_near_break_even_upper:threshold"]["expr"] == "vector(0.4)"
    for name, rule in rules.items():
        # every aggregation and join with a label list names the cluster; empty on () joins the constants
        for clause in ("by (", "on ("):
            for part in rule["expr"].split(clause)[1:]:
                assert part.startswith("cluster, ") or part.startswith(")"), f"{name}: {clause}{part[:40]}"
        if "alert" in rule:
            assert rule["labels"]["env"] == "prod"
            assert rule["annotations"]["runbook_url"].startswith("https://wiki.example.com/specdec/runbooks#")
            assert rule["annotations"]["runbook_url"].split("#")[1] == source[name]["annotations"]["runbook_url"].split("#")[1]
    below = rules["SpecDecodeAcceptanceBelowBreakEven"]
    assert below["for"] == "2m" and below["labels"]["severity"] == "warning" and below["labels"]["team"] == "inference"

    runbook = "https://wiki.example.com/specdec/runbooks#specdecodeacceptancebelowbreakeven"
    labels = {"severity": "warning", "team": "inference", "env": "prod"}
    inputs = [
        # 20% acceptance at 10 draft tokens/s in cluster a; the same model in cluster b accepts 90%: summed
        # across clusters it would be 55%, above break-even, and nothing would fire
        *pod("a", "low", 600, 120),
        *pod("b", "low", 600, 540),
        # 20% acceptance at 3 draft tokens/s: above alerts/'s guard (1/s), below this release's (5/s)
        *pod("a", "quiet", 180, 36),
        # 40% acceptance, no break-even exported: below alerts/'s fallback 0.5, above this release's 0.3
        *pod("a", "fallback", 600, 240),
        # 20% acceptance, the sidecar exports a calibrated break-even of 0.1: the exported one counts
        *pod("a", "calibrated", 600, 120, break_even=0.1),
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [
                # for: 2m instead of 10m: pending from 4m (promtool's evaluation of these series), firing
                # from 6m on; the defaults' 10m would keep it pending until 14m (the test below)
                {"eval_time": "3m", "alertname": "SpecDecodeAcceptanceBelowBreakEven", "exp_alerts": []},
                {
                    "eval_time": "7m",
                    "alertname": "SpecDecodeAcceptanceBelowBreakEven",
                    "exp_alerts": [below_break_even("low", "20%", "30%", {**labels, "cluster": "a"}, runbook)],
                },
                {
                    "eval_time": "25m",
                    "alertname": "SpecDecodeAcceptanceBelowBreakEven",
                    "exp_alerts": [below_break_even("low", "20%", "30%", {**labels, "cluster": "a"}, runbook)],
                },
            ],
            "promql_expr_test": [
                {
                    "expr": "specdec:draft_tokens_guard:threshold",
                    "eval_time": "5m",
                    "exp_samples": [{"labels": "specdec:draft_tokens_guard:threshold", "value": 5}],
                },
                {
                    # per cluster: the two clusters' "low" stay apart
                    "expr": 'namespace_model:specdec_acceptance:ratio_rate5m{model="low"}',
                    "eval_time": "10m",
                    "exp_samples": [
                        {
                            "labels": 'namespace_model:specdec_acceptance:ratio_rate5m{cluster="a",model="low",namespace="ml"}',
                            "value": 0.2,
                        },
                        {
                            "labels": 'namespace_model:specdec_acceptance:ratio_rate5m{cluster="b",model="low",namespace="ml"}',
                            "value": 0.9,
                        },
                    ],
                },
            ],
        }
    ]
    run_promtool_tests(tmp_path, groups, tests)


def test_the_same_cases_fire_differently_with_the_defaults(tmp_path):
    """The control for the test above: with the chart's defaults (and no cluster label in the series) the
    same traffic fires for the quiet and fallback models too, under alerts/'s severity, and only after 10m."""
    groups = rendered_rule(tmp_path, None, "--set", "prometheusRule.enabled=true")["spec"]["groups"]
    assert groups == SOURCE_GROUPS  # the defaults render alerts/ unchanged
    source_runbook = rules_by_name(SOURCE_GROUPS)["SpecDecodeAcceptanceBelowBreakEven"]["annotations"]["runbook_url"]
    labels = {"severity": "critical"}
    inputs = [*pod("", "quiet", 180, 36), *pod("", "fallback", 600, 240), *pod("", "calibrated", 600, 120, 0.1)]
    tests = [
        {
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "SpecDecodeAcceptanceBelowBreakEven", "exp_alerts": []},
                {
                    "eval_time": "25m",
                    "alertname": "SpecDecodeAcceptanceBelowBreakEven",
                    "exp_alerts": [
                        below_break_even("fallback", "40%", "50%", labels, source_runbook),
                        below_break_even("quiet", "20%", "50%", labels, source_runbook),
                    ],
                },
            ],
        }
    ]
    run_promtool_tests(tmp_path, groups, tests)


def test_a_release_that_does_not_own_the_recording_rules_ships_only_alerts(tmp_path):
    groups = rendered_rule(
        tmp_path, None, "--set", "prometheusRule.enabled=true", "--set", "prometheusRule.recordingRules.owned=false"
    )["spec"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert rules and all("alert" in r for r in rules)
    assert [r["alert"] for r in rules] == [r["alert"] for g in SOURCE_GROUPS for r in g["rules"] if "alert" in r]
    # a threshold set here would have no effect: the render says so
    proc = helm_template(
        "--set", "prometheusRule.enabled=true", "--set", "prometheusRule.recordingRules.owned=false",
        "--set", "prometheusRule.thresholds.draft_tokens_guard=5", check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "prometheusRule.thresholds.draft_tokens_guard is set, but" in proc.stderr
    rules_file = tmp_path / "alerts-only.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}))
    assert promtool("check", "rules", rules_file.name, cwd=tmp_path).returncode == 0


@pytest.mark.parametrize(
    "args, says",
    [
        (["--set", "prometheusRule.alerts.SpecDecodeNoSuchAlert.enabled=false"], "prometheusRule.alerts.SpecDecodeNoSuchAlert"),
        (["--set", "prometheusRule.thresholds.no_such=1"], "specdec:no_such:threshold"),
        (["--set", "prometheusRule.alerts.SpecDecodeNearBreakEven.severity=page"], "severity"),
        (["--set", "prometheusRule.alerts.SpecDecodeNearBreakEven.for=ten"], "for"),
        (["--set", "prometheusRule.clusterLabel=my-cluster"], "clusterLabel"),
    ],
)
def test_bad_rule_values_fail_the_render(args, says):
    proc = helm_template("--set", "prometheusRule.enabled=true", *args, check=False)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr


CI_FILES = sorted((CHART / "ci").glob("*.yaml"))


@pytest.mark.parametrize("values_file", CI_FILES, ids=[p.stem for p in CI_FILES])
def test_example_values_set_the_sidecar_and_the_rules_alike(values_file, tmp_path):
    """Where an example renders both the sidecar and the rules, the fallback thresholds the rules record are
    the sidecar's --break-even and --near-break-even-upper (the sidecar exports the same numbers)."""
    docs = [d for d in yaml.safe_load_all(helm_template("-f", str(values_file)).stdout) if d]
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if not (rules and deployments):
        pytest.skip(f"{values_file.name} does not render both the sidecar and the rules")
    recorded = rules_by_name(rules[0]["spec"]["groups"])
    spec = deployments[0]["spec"]["template"]["spec"]
    [sidecar] = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "specdec-sidecar"]
    flags = dict(a[2:].split("=", 1) for a in sidecar["args"] if a.startswith("--") and "=" in a)
    assert recorded["specdec:acceptance_break_even:threshold"]["expr"] == f"vector({flags.get('break-even', '0.5')})"
    assert (
        recorded["specdec:acceptance_near_break_even_upper:threshold"]["expr"]
        == f"vector({flags.get('near-break-even-upper', '0.65')})"
    )
    # the baseline comparison's neutral band is the sidecar's own verdict band
    assert recorded["specdec:speedup_band:threshold"]["expr"] == f"vector({flags.get('band', '0.05')})"


def test_all_toggles_example_judges_by_its_break_even(tmp_path):
    """ci/all-toggles-values.yaml runs the sidecar with --break-even=0.45: a pod that exports it and one that
    exports nothing are both judged at 0.45 (47% accepted: no page; 40%: a page)."""
    groups = rendered_rule(tmp_path, None, "-f", str(CHART / "ci" / "all-toggles-values.yaml"))["spec"]["groups"]
    runbook = rules_by_name(groups)["SpecDecodeAcceptanceBelowBreakEven"]["annotations"]["runbook_url"]
    inputs = [
        *pod("", "exported", 600, 282, break_even=0.45),
        *pod("", "silent", 600, 282),
        *pod("", "poor", 600, 240, break_even=0.45),
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [
                {
                    "eval_time": "25m",
                    "alertname": "SpecDecodeAcceptanceBelowBreakEven",
                    "exp_alerts": [below_break_even("poor", "40%", "45%", {"severity": "critical", "team": "inference"}, runbook)],
                }
            ],
        }
    ]
    run_promtool_tests(tmp_path, groups, tests)


def test_sync_refuses_a_threshold_the_chart_could_not_set(tmp_path, monkeypatch):
    """tools/sync_chart.py: the chart sets specdec:<key>:threshold rules to vector(<value>), so in alerts/
    they must be exactly vector(<number>)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_chart", ROOT / "tools" / "sync_chart.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    (tmp_path / "alerts").mkdir()
    rules = tmp_path / "alerts" / "r.yaml"
    monkeypatch.setattr(sync, "ROOT", tmp_path)
    monkeypatch.setattr(sync, "SOURCES", ((tmp_path / "alerts", "*.yaml", tmp_path / "files" / "rules"),))
    good = {"groups": [{"name": "t", "rules": [{"record": "specdec:x_guard:threshold", "expr": "vector(2.5)"}]}]}
    rules.write_text(yaml.safe_dump(good))
    assert sync.rule_problems() == [] and sync.main([]) == 0 and sync.main(["--check"]) == 0
    good["groups"][0]["rules"][0]["expr"] = "vector(1) * 2"
    rules.write_text(yaml.safe_dump(good))
    [problem] = sync.rule_problems()
    assert "specdec:x_guard:threshold must be vector(<number>)" in problem and "prometheusRule.thresholds.x_guard" in problem
    assert sync.main(["--check"]) == 1


def test_values_list_every_recorded_constant():
    """Every `specdec:<key>:threshold` of alerts/ is a documented key of prometheusRule.thresholds (and the
    schema types it), so a new constant cannot be added without saying how a release sets it."""
    keys = {
        r["record"].split(":")[1]
        for g in SOURCE_GROUPS
        for r in g["rules"]
        if r.get("record", "").startswith("specdec:") and r["record"].endswith(":threshold")
    }
    values = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["thresholds"]
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    typed = schema["properties"]["prometheusRule"]["properties"]["thresholds"]["properties"]
    assert keys and set(values) == keys and set(typed) == keys
