"""Alert and recording rules: promtool checks and unit tests, structure every alert must have, amtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sidecar.decision import DEFAULT_BREAK_EVEN, DEFAULT_NEAR_UPPER

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "alerts" / "alerts.yaml"
RECORDING = ROOT / "alerts" / "recording-rules.yaml"
RUNBOOKS = (ROOT / "docs" / "runbooks.md").read_text()
RUNBOOK_BASE = "https://github.com/specdec-sidecar/specdec-sidecar/blob/main/docs/runbooks.md#"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (make test installs the Debian packages prometheus and "
                    "prometheus-alertmanager)")
    return path


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def recording() -> list[dict]:
    return [rule for group in yaml.safe_load(RECORDING.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_rules():
    out = subprocess.run([tool("promtool"), "check", "rules", str(RECORDING), str(ALERTS)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["recording_test.yaml", "alerts_test.yaml", "calibrated_test.yaml", "baseline_test.yaml",
                                  "proxy_test.yaml"])
def test_promtool_test_rules(name):
    out = subprocess.run([tool("promtool"), "test", "rules", name], cwd=ROOT / "tests" / "rules",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_thresholds_match_the_sidecars_decision_framework():
    exprs = {r["record"]: r["expr"].strip() for r in recording()}
    assert exprs["specdec:acceptance_break_even:threshold"] == f"vector({DEFAULT_BREAK_EVEN})"
    assert exprs["specdec:acceptance_near_break_even_upper:threshold"] == f"vector({DEFAULT_NEAR_UPPER})"
    # the thresholds are written nowhere else
    for rule in alerts():
        assert "0.5 " not in rule["expr"] and "0.65" not in rule["expr"], rule["alert"]


def test_recording_rule_names_and_comments():
    """level:metric:operations names; each rule, or the family it belongs to, has a comment on why."""
    lines = RECORDING.read_text().splitlines()
    previous = None
    block: list[str] = []
    for line in lines:
        match = re.match(r"\s*- record: (\S+)$", line)
        if not match:
            block.append(line.strip())
            continue
        name = match.group(1)
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name
        commented = any(b.startswith("#") for b in block)
        same_family = previous is not None and previous.rsplit(":", 1)[0] == name.rsplit(":", 1)[0]
        assert commented or same_family, f"{name} has no comment saying why it exists"
        previous, block = name, []


def test_every_alert_is_complete():
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)) == 17
    tested = "".join(path.read_text() for path in sorted((ROOT / "tests" / "rules").glob("*_test.yaml")))
    for rule in alerts():
        name = rule["alert"]
        assert name.startswith("SpecDecode") and re.fullmatch(r"[A-Z][A-Za-z0-9]+", name)
        assert re.fullmatch(r"\d+m", rule["for"]), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        summary = rule["annotations"]["summary"]
        assert "{{" not in summary and summary.endswith("."), name
        description = rule["annotations"]["description"]
        assert "$value" in description and "$labels" in description, name
        url = rule["annotations"]["runbook_url"]
        assert url == RUNBOOK_BASE + name.lower(), name
        assert re.search(rf"^## {name}$", RUNBOOKS, re.M), f"no runbook section for {name}"
        assert f"alertname: {name}" in tested, f"no promtool test for {name}"


def test_traffic_guard_on_every_acceptance_alert():
    """Acceptance and TPOT alerts guard on draft tokens; those against the baseline arm on each arm's requests
    (their ratios are recorded only above the minimum, and the model-wide part says it again)."""
    for rule in alerts():
        if "acceptance" in rule["expr"] or "tpot" in rule["expr"]:
            guards = ("specdec:draft_tokens_guard:threshold", "specdec:baseline_min_requests:threshold")
            assert any(guard in rule["expr"] for guard in guards), rule["alert"]


def test_traffic_guard_on_the_alerts_that_are_not_about_speculation():
    """KV cache and preemptions guard on generated tokens (they hold without speculation too); the proxy's
    ratio and latency alerts on its requests. CPU throttling needs none: a throttled container is busy."""
    by_name = {rule["alert"]: rule["expr"] for rule in alerts()}
    for name in ("SpecDecodeKVCacheSaturated", "SpecDecodePreemptionsRising"):
        assert "specdec:generation_tokens_guard:threshold" in by_name[name], name
    for name in ("SpecDecodeProxyErrorRatioHigh", "SpecDecodeProxyUpstreamUnreachable", "SpecDecodeProxyAddedLatencyHigh"):
        assert "specdec:proxy_requests_guard:threshold" in by_name[name], name


def test_paging_alerts_are_the_ones_users_feel():
    """What pages (critical): acceptance below break-even, a vLLM that was up and is gone, no sidecar scraped, and
    the errors clients get through the proxy. A vLLM still loading is info; everything else a warning."""
    severity = {rule["alert"]: rule["labels"]["severity"] for rule in alerts()}
    assert {name for name, s in severity.items() if s == "critical"} == {
        "SpecDecodeAcceptanceBelowBreakEven", "SpecDecodeSidecarUpstreamDown", "SpecDecodeSidecarAbsent",
        "SpecDecodeProxyErrorRatioHigh"}
    assert {name for name, s in severity.items() if s == "info"} == {"SpecDecodeSidecarUpstreamStarting"}
    # the down alert pages only for a vLLM the sidecar has seen up; the starting one only for one it has not
    by_name = {rule["alert"]: rule["expr"] for rule in alerts()}
    assert "specdec_upstream_last_success_timestamp_seconds > 0" in by_name["SpecDecodeSidecarUpstreamDown"]
    assert "specdec_upstream_last_success_timestamp_seconds == 0" in by_name["SpecDecodeSidecarUpstreamStarting"]


def test_baseline_ratios_are_gated_by_both_arms_and_the_band_is_decisions():
    from sidecar.decision import DEFAULT_BAND

    exprs = {r["record"]: r["expr"].strip() for r in recording()}
    assert exprs["specdec:speedup_band:threshold"] == f"vector({DEFAULT_BAND})"
    ratios = [name for name in exprs if ":specdec_speedup_vs_baseline_" in name]
    assert len(ratios) == 8  # TPOT and TTFT, P50 and P99, per bucket and per model
    for name in ratios:
        for arm in ("baseline", "speculative"):
            assert f'increase30m{{arm="{arm}"}} >= on () group_left () specdec:baseline_min_requests:threshold' in exprs[name]


def test_amtool_check_config():
    out = subprocess.run([tool("amtool"), "check-config", str(ROOT / "alerts" / "alertmanager.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alertmanager_routes_critical_to_pagerduty_and_inhibits_near_break_even():
    config = yaml.safe_load((ROOT / "alerts" / "alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    routes = config["route"]["routes"]
    critical = next(r for r in routes if 'severity = "critical"' in r["matchers"])
    pd = receivers[critical["receiver"]]["pagerduty_configs"][0]
    assert "routing_key_file" in pd and "routing_key" not in pd and pd["send_resolved"] is True
    assert "severity" in pd["severity"]
    assert set(config["route"]["group_by"]) >= {"namespace", "model"}
    warning = next(r for r in routes if "warning" in " ".join(r["matchers"]))
    assert "pagerduty_configs" not in receivers[warning["receiver"]]
    inhibit, ratio, unreachable = config["inhibit_rules"]
    assert 'alertname = "SpecDecodeAcceptanceBelowBreakEven"' in inhibit["source_matchers"]
    assert 'alertname = "SpecDecodeNearBreakEven"' in inhibit["target_matchers"]
    assert set(inhibit["equal"]) == {"namespace", "model"}
    # vLLM gone pages once: the proxy's 502 alerts of the same namespace / pod are held back meanwhile; every
    # label an inhibition matches on is one its source and target alerts carry
    alerts = {r["alert"]: r for g in yaml.safe_load((ROOT / "alerts" / "alerts.yaml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    for rule, target, equal in ((ratio, "SpecDecodeProxyErrorRatioHigh", {"namespace"}),
                                (unreachable, "SpecDecodeProxyUpstreamUnreachable", {"namespace", "pod"})):
        assert rule["source_matchers"] == ['alertname = "SpecDecodeSidecarUpstreamDown"']
        assert rule["target_matchers"] == [f'alertname = "{target}"'] and set(rule["equal"]) == equal
        assert target in alerts and alerts[target]["labels"]["severity"] in ("critical", "warning")
