"""Live: the baseline arm on real vLLM, against a paired ``measure`` of the same two servers.

Two real vLLM servers (the tiny target with n-gram speculation, k = 4, and without), first ``measure``d alone
(4 concurrent requests, 8 requests per cell), then each behind its own sidecar (each detects its arm from
vLLM's page); a real Prometheus with the shipped rules,
copied with 40 s windows, ``for: 2s`` and a per-arm minimum of 15 requests (tools/baseline_proof.py's
``rules_copy``); a load generator sending greedy and temperature-1.0 echo prompts in turns, 4 clients on
each arm for 45 s (``balanced``: both arms at the same concurrency, as ``measure`` compares them; with random
routing the slower arm holds more of the clients, see docs/baseline.md). Then the baseline's sidecar is
stopped. About three minutes, most of it vLLM starting.

Each server computes on a core of its own (``VLLM_CPU_OMP_THREADS_BIND``), as two replicas have a machine each:
with both on both cores, each slowed the other down in the live phase by how busy the other was, which
``measure`` (one server at a time) never sees, and the live greedy ratio read 1.80 against ``measure``'s 1.29.
Both wait on their step queues without spinning (``devstack/no_busy_poll``): spinning, two CPU servers on 2
cores take the cores from each other for seconds at a time and one arm answers almost nothing in a phase
(docs/baseline.md). ``measure`` and the live phase see the same two servers.

Asserted: each arm detected; both arms served the minimum in both buckets and every ratio is recorded; a
bucket whose live ratio is below 0.9 raises SpecDecodeSlowerThanBaseline and one above 1 does not; wherever
the paired ``measure``'s 95% interval excludes 1 the live ratio gives the same verdict (helps / hurts; neutral
fails), and where it lies more than 25% from ``measure``'s point the test ends as an expected failure naming
the cells;
with the baseline gone every ratio is absent at once and no alert against the baseline remains or appears.
The test asserts agreement, not a direction.
"""

from __future__ import annotations

import json

import pytest

from devstack.alerting_stack import find_binary
from devstack.vllm_server import vllm_python
from tools.baseline_proof import Arms, compare, measured, own_cores, run_measure, start_servers

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(420)]

GREEDY, HOT = "0", "0.7-1.0"
CLIENTS_PER_SERVER = 4


def test_live_ratios_agree_with_measure_and_an_arm_leaving_raises_nothing(tmp_path):
    if not vllm_python().exists():
        pytest.fail(f"vLLM is not installed at {vllm_python()} (run `make vllm`)")
    if find_binary("prometheus") is None:
        pytest.fail("prometheus is not installed (make test installs it)")
    # each server's compute on a core of its own, its readers waiting without spinning
    cores = own_cores()
    if not cores:
        pytest.skip("two servers on their own cores need at least 2 cores")
    spec, base = start_servers(tmp_path, cpus=cores, busy_poll=False)
    arms = None
    try:
        # measure first, on a machine where nothing else runs: with the sidecars polling and Prometheus
        # evaluating the rules every second beside it, one run's greedy cell read 0.33x [0.30-0.38] where the
        # live phase just before had 1.25 (vLLM's CPU build computes on both cores; any other process stalls it)
        paired = measured(run_measure(spec.url, base.url, tmp_path / "measure", "0,1", str(CLIENTS_PER_SERVER), 8, 48))
        arms = Arms(spec, base, tmp_path, window="40s", for_="2s", min_requests=15)
        # Two servers, two sidecars, Prometheus and the load on 2 cores: should one server still be starved for
        # a whole phase (with vLLM spinning, it answered 4 requests in 45 s once), that is this machine, not the
        # comparison: the phase is run once more (its 40 s windows then hold the second phase alone) and the
        # comparison is asserted on a phase where both arms were served.
        for attempt in (1, 2):
            reading = arms.level(CLIENTS_PER_SERVER, 45, (0.0, 1.0), turn=5, mix="turns", max_tokens=48,
                                 seed=attempt, routing="balanced")
            print(f"\nlive (phase {attempt}):", json.dumps(reading["buckets"]), reading["alerts"], reading["sent"])
            answered = {arm: sum(n for key, n in reading["sent"].items() if key.startswith(arm + "@"))
                        for arm in ("speculative", "baseline")}
            if min(answered.values()) >= 30:
                break
            print(f"phase {attempt}: an arm answered too little to compare: {reading['sent']}")
        assert min(answered.values()) >= 30, f"an arm answered too little to compare, twice: {reading['sent']}"
        for bucket in (GREEDY, HOT):
            row = reading["buckets"][bucket]
            assert row["requests_speculative"] >= 15 and row["requests_baseline"] >= 15, row
            assert all(f"{m}:{q}" in row for m in ("tpot", "ttft") for q in ("p50", "p99")), row
        # a slow bucket's alert fires (its ratio below the line for longer than the 2 s of for:), a fast one's not
        slower = {a.get("temperature_bucket") for a in reading["alerts"] if a["alertname"] == "SpecDecodeSlowerThanBaseline"}
        for bucket in (GREEDY, HOT):
            ratio = reading["buckets"][bucket]["tpot:p50"]
            if ratio < 0.9:
                assert bucket in slower, (bucket, ratio, reading["alerts"])
            elif ratio > 1.0:
                assert bucket not in slower, (bucket, ratio, reading["alerts"])

        rows = compare(reading, paired, CLIENTS_PER_SERVER, 0.05)
        print("against measure:", json.dumps(rows))
        assert {r["bucket"] for r in rows} == {GREEDY, HOT}
        # wherever measure's interval excludes 1: the same verdict (a neutral live reading fails too), and the
        # live ratio within 25% of its point. With a core each the points held in every run recorded (both
        # directions, up to -25%: docs/baseline.md); measure's own point with 8 requests per cell moves by a fifth
        # from run to run (the greedy cell read 1.34 to 1.84 in three runs), so a point outside 25% ends
        # the test as an expected failure naming the cells, with the exact ratio the load generator saw beside it
        decided = [row for row in rows if row["measure_tpot_verdict"] in ("helps", "hurts")]
        disagreements = [row for row in decided if row["live_verdict"] != row["measure_tpot_verdict"]]
        outside = [row for row in decided if row not in disagreements and not row["within_25pct"]]

        gone = arms.drop_baseline()
        print("baseline gone:", json.dumps(gone))
        assert gone["ratios_left"] == {}, gone
        # nothing that reads the comparison fires, before or after; the speculative arm's own alerts (its
        # acceptance against break-even) go on as they were and may come and go with its traffic
        against_baseline = ("SpecDecodeSlowerThanBaseline", "SpecDecodeTailRegression")
        assert not [a for a in gone["alerts_after"] if a.startswith(against_baseline)], gone
        assert gone["replicas"] == {"speculative": 1.0}
        assert not disagreements, f"live and measure disagree: {json.dumps(disagreements)}"
        if outside:
            pytest.xfail("live ratio more than 25% from measure's point: " + ", ".join(
                f"{r['bucket']}: live {r['live_tpot_p50_ratio']:.2f} {r['live_verdict']} (exact at the client "
                f"{r['client_tpot_p50_ratio'] or float('nan'):.2f}), measure {r['measure_tpot']['value']:.2f} "
                f"{r['measure_tpot_verdict']}" for r in outside))
    finally:
        if arms is not None:
            arms.stop()
        spec.stop()
        base.stop()


def test_the_no_busy_poll_hook_reaches_vllms_step_queue():
    """VllmServer(busy_poll=False) puts devstack/no_busy_poll first on vLLM's PYTHONPATH: in vLLM's own Python,
    the queue readers then block at once and re-check every millisecond (vLLM: spin 1 s, re-check 5 s)."""
    import subprocess

    from devstack.vllm_server import VllmServer

    if not vllm_python().exists():
        pytest.fail(f"vLLM is not installed at {vllm_python()} (run `make vllm`)")
    probe = ("from vllm.distributed.device_communicators import shm_broadcast as m; "
             "print(m.SpinCondition.__init__.__defaults__, m.SHM_READER_RECHECK_INTERVAL_MS)")

    def read(server: VllmServer) -> subprocess.CompletedProcess:
        return subprocess.run([str(vllm_python()), "-c", probe], env=server.environment(), capture_output=True,
                              text=True, timeout=120)

    plain, hooked = read(VllmServer()), read(VllmServer(busy_poll=False))
    assert plain.stdout.split() == ["(1,)", "5000"], plain.stdout + plain.stderr
    assert hooked.stdout.split() == ["(0,)", "1"], hooked.stdout + hooked.stderr
