"""``measure`` against two real vLLM servers (CPU build, the tiny target): n-gram speculation vs none.

A small grid (temperatures 0 and 1, concurrency 1 and 2, 4 requests a cell, no warm-up) so the whole test,
both start-ups included, stays around two to three minutes on 2 cores. Checked:

* every spec cell's accepted and drafted tokens equal the sums of vLLM's per-request numbers (recomputed here
  from ``requests.jsonl``), and all spec cells together equal the deltas of vLLM's own server-wide counters,
  read independently from its ``/metrics``: nothing measured was lost or counted twice;
* every spec cell has a throughput speed-up with a 95% interval around it, and a TPOT speed-up exactly when
  both of its servers' requests have a TPOT (none is ever 0: a response that arrived in one read has none);
* the plots are valid PNGs.

No assertion on how fast anything is: the speed-up figures come from the run recorded in docs/measure.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from collections import defaultdict

import pytest

from conftest import start_vllm
from sidecar.calibration import load as load_calibration
from sidecar.commands.measure_stats import VLLM_CONFIG_KEY, schedule
from sidecar.upstream.vllm_metrics import read_vllm_metrics
from devstack.vllm_server import REPO, ngram_config, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


# Runs the installed vLLM's own schedule validator and reads SpeculativeConfig's fields from its source,
# without importing the whole engine (which takes 15-30 s here).
VLLM_CHECK = """
import ast, importlib.util, json, pathlib, sys
root = pathlib.Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
tree = ast.parse((root / "config" / "speculative.py").read_text())
fields = {n.target.id for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "SpeculativeConfig"
          for n in c.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
if sys.argv[1] not in fields:
    sys.exit(f"SpeculativeConfig has no field {sys.argv[1]}")
namespace = {}
source = root / "v1" / "spec_decode" / "dynamic" / "utils.py"
exec(compile(source.read_text(), str(source), "exec"), namespace)
print(json.dumps(namespace["validate_and_normalize_dynamic_sd_schedule"](json.loads(sys.argv[2]))))
"""


def vllm_accepts_schedule(key: str, value: list) -> list:
    done = subprocess.run([str(vllm_python()), "-c", VLLM_CHECK, key, json.dumps(value)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_suggested_schedules_pass_vllms_own_validation():
    suggested = schedule([(1, 4), (4, 4), (8, 2), (32, 0)])
    assert suggested.key == VLLM_CONFIG_KEY
    assert vllm_accepts_schedule(suggested.key, suggested.value) == [[1, 7, 4], [8, 31, 2], [32, 32, 0]]


def spec_counters(url: str) -> tuple[float, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        snap = read_vllm_metrics(response.read().decode())
    accepted = sum(e.accepted_tokens or 0 for e in snap.engines.values())
    drafted = sum(e.draft_tokens or 0 for e in snap.engines.values())
    return accepted, drafted


def settled(url: str, timeout: float = 30.0) -> tuple[float, float]:
    """vLLM's counters once they stop moving (its stats logger may count the last step a moment late)."""
    import time

    deadline = time.monotonic() + timeout
    previous = spec_counters(url)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        current = spec_counters(url)
        if current == previous:
            return current
        previous = current
    raise AssertionError("vLLM's counters kept moving with no traffic")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The speculative and the baseline server, started side by side (both cores, one start-up's wait)."""
    spec = start_vllm(tmp_path_factory, ngram_config(k=4))
    baseline = start_vllm(tmp_path_factory, None)
    errors: list[BaseException] = []

    def start(server) -> None:
        try:
            server.start()
        except BaseException as error:  # noqa: BLE001 — reported below, after both attempts
            errors.append(error)

    threads = [threading.Thread(target=start, args=(s,)) for s in (spec, baseline)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        if errors:
            raise errors[0]
        yield spec, baseline
    finally:
        spec.stop()
        baseline.stop()


def test_measure_on_real_vllm(servers, tmp_path):
    spec, baseline = servers
    before = settled(spec.url)
    out = tmp_path / "measure"
    command = [sys.executable, "-m", "sidecar", "measure", "--url", spec.url, "--baseline-url", baseline.url,
               "--temperatures", "0,1", "--concurrency", "1,2", "--requests", "4", "--warmup", "0",
               "--rounds", "2", "--max-tokens", "32", "--prompts", "echo", "--bootstrap", "300",
               "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    after = settled(spec.url)

    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2 * 4 and all(r["ok"] for r in records)

    sums: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    tpots: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        key = (r["server"], r["temperature"], r["concurrency"])
        sums[key]["requests"] += 1
        assert r["tpot_s"] is None or r["tpot_s"] > 0, r
        if r["tpot_s"] is not None:
            tpots[key].append(r["tpot_s"])
        if r["server"] == "spec":
            assert r["acceptance_source"] == "vllm" and r["num_spec_tokens"] == 4, r
            sums[key]["accepted"] += r["accepted_tokens"]
            sums[key]["drafted"] += r["draft_tokens"]
        else:
            assert r["draft_tokens"] is None  # no speculation there, so no vLLM acceptance either

    cells = results["cells"]
    assert {(c["server"], c["temperature"], c["concurrency"]) for c in cells} == set(sums)
    total_accepted = total_drafted = 0
    for cell in cells:
        want = sums[(cell["server"], cell["temperature"], cell["concurrency"])]
        assert cell["requests"] == want["requests"] == 4 and cell["errors"] == 0
        if cell["server"] != "spec":
            assert cell["speedup"] is None
            continue
        assert (cell["accepted_tokens"], cell["draft_tokens"]) == (want["accepted"], want["drafted"])
        assert cell["acceptance_rate"] == pytest.approx(want["accepted"] / want["drafted"], rel=1e-12)
        total_accepted += cell["accepted_tokens"]
        total_drafted += cell["draft_tokens"]
        s = cell["speedup"]["throughput"]
        assert s["value"] > 0 and s["ci_low"] <= s["value"] <= s["ci_high"], cell
        # TPOT needs spacing between tokens: a response that arrived in one read has none (its TPOT is null,
        # never 0), and a side with no TPOT at all leaves the cell without a TPOT comparison
        s = cell["speedup"]["tpot"]
        timed = [tpots[(server, cell["temperature"], cell["concurrency"])] for server in ("spec", "baseline")]
        if all(timed):
            assert s["value"] > 0, cell
            if s["ci_low"] is not None:
                assert s["ci_low"] <= s["value"] <= s["ci_high"], cell
        else:
            assert s["value"] is None, (cell, timed)
        assert cell["speedup"]["verdict"] in ("helps", "neutral", "hurts")
        if timed[0]:
            assert cell["tpot_p50_s"] <= cell["tpot_p95_s"] <= cell["tpot_p99_s"]
    # Independently: vLLM's own counters moved by exactly what measure attributed to its requests.
    assert (total_accepted, total_drafted) == (after[0] - before[0], after[1] - before[1])

    # The engine's collapse by temperature, as the verdicts see it (acceptance, not speed).
    by_temperature = defaultdict(lambda: [0, 0])
    for cell in cells:
        if cell["server"] == "spec":
            by_temperature[cell["temperature"]][0] += cell["accepted_tokens"]
            by_temperature[cell["temperature"]][1] += cell["draft_tokens"]
    assert by_temperature[0.0][0] / by_temperature[0.0][1] > by_temperature[1.0][0] / max(1, by_temperature[1.0][1])

    fit = results["break_even_fit"]
    assert fit["k"] == 4 and [lv["concurrency"] for lv in fit["levels"]] == [1, 2]
    assert fit["schedule"]["key"] == "num_speculative_tokens_per_batch_size"
    assert fit["schedule"]["value"][0][0] == 1
    vllm_accepts_schedule(fit["schedule"]["key"], fit["schedule"]["value"])
    # With a baseline the run also writes the calibration the sidecar loads, for the model it measured.
    calibration = load_calibration(out / "calibration.json").models[results["model"]]
    assert calibration.k == 4 and [lv.concurrency for lv in calibration.levels] == [1.0, 2.0]

    import matplotlib.pyplot as plt

    for name in ("measure-acceptance.png", "measure-speedup.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = plt.imread(path).shape[:2]
        assert height > 200 and width > 400
    print(done.stdout[-3000:])
