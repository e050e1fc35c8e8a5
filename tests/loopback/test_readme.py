"""The README's tables stay true: every setting has a row, and the exported-series table lists exactly the
families a sidecar that has seen everything really exports (``fakes.fed_sidecar_page``: moving vLLM counters
from a V1 and a V0 engine, traffic through the tap in every bucket, a calibration), in both directions."""

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fakes import fed_sidecar_page
from sidecar.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
ENGINE = "specdec_engine_"


def test_every_setting_has_a_row():
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        env = "SPECDEC_" + name.upper()
        assert re.search(rf"^\| `{flag}` \| `{env}` \|", README, re.M), name


def exported_families(text: str) -> dict[str, str]:
    """Family name as the README writes it (counters with ``_total``) -> type, for every family on the page."""
    families = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        families[name] = family.type
    return families


def documented_families() -> dict[str, str]:
    """Family name -> the type column, for each row of the README's exported-series table."""
    rows = re.findall(r"^\| `(specdec_[a-z0-9_*]+)` \| ([a-zA-Z ()]+?) \|", README, re.M)
    assert len(rows) == len(dict(rows)), "a family has two rows"
    return dict(rows)


async def test_the_exported_series_table_is_what_a_fed_sidecar_exports(tmp_path):
    exported = exported_families(await fed_sidecar_page(tmp_path))
    documented = documented_families()
    assert len(exported) > 40 and "specdec_engine_*" in documented

    undocumented = []
    for name, kind in exported.items():
        if name.startswith(ENGINE):  # the wildcard row: the same family per engine
            if "specdec_" + name.removeprefix(ENGINE) not in documented:
                undocumented.append(name)
        elif name not in documented:
            undocumented.append(name)
        else:
            assert documented[name].split()[0] == kind, (name, documented[name], kind)
    assert not undocumented, f"exported but not in the README's table: {sorted(undocumented)}"

    missing = [name for name in documented if name != "specdec_engine_*" and name not in exported]
    assert not missing, f"in the README's table but not exported by a fed sidecar: {sorted(missing)}"
    assert any(name.startswith(ENGINE) for name in exported)


async def test_promtool_check_metrics_finds_nothing_on_a_fed_sidecars_page(tmp_path):
    """Prometheus's own linter (``promtool check metrics``: names, units, HELP, counters' suffixes) on
    everything a sidecar that has seen everything exports."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is not installed (make test installs it)"
    page = await fed_sidecar_page(tmp_path)
    done = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
