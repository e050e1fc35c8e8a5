"""The README's tables stay true: every setting and every exported family is documented."""

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from sidecar.export.collector import HealthCollector
from sidecar.config import Settings, build_settings
from sidecar.upstream.derive import advance, derive
from sidecar.upstream.monitor import MonitorState, OwnMetrics
from sidecar.upstream.vllm_metrics import read_vllm_metrics
from fakes import fixture_text

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_has_a_row():
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        env = "SPECDEC_" + name.upper()
        assert re.search(rf"^\| `{flag}` \| `{env}` \|", README, re.M), name


def test_every_exported_family_has_a_row():
    settings = build_settings()
    snapshots = [read_vllm_metrics(fixture_text(f"vllm-0.32-draft-t{i}.prom")) for i in (1, 3)]
    points = [advance(None, 0.0, snapshots[0])]
    points.append(advance(points[0], 60.0, snapshots[1]))
    health = derive(points, settings.windows, min_drafts=1, verdict_window=settings.verdict_window,
                    break_even=0.5, near_upper=0.65)
    registry = CollectorRegistry()
    OwnMetrics(registry)
    registry.register(HealthCollector(lambda: MonitorState(up=True, health=health, scrapes=2), settings))
    names = {family.name for family in registry.collect()}
    assert len(names) > 20
    documented = set(re.findall(r"^\| `(specdec_[a-z_*]+)`", README, re.M))
    for name in names:
        exposed = {name, name + "_total"}
        ok = exposed & documented or (name.startswith("specdec_engine_") and "specdec_engine_*" in documented
                                       and "specdec_" + name.removeprefix("specdec_engine_") in documented)
        assert ok, name
