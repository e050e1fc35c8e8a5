"""calibration.json: every rejection is one line naming the field; what is written reads back equal; the
interpolation over load levels and its clamping at the ends."""

from __future__ import annotations

import copy
import json
import math

import pytest

from sidecar.calibration import (
    SCHEMA,
    Calibration,
    CalibrationError,
    Level,
    ModelCalibration,
    dumps,
    load,
    parse,
)

GOOD = {
    "schema": SCHEMA,
    "models": {
        "tiny-target": {
            "method": "ngram",
            "k": 4,
            "vllm_version": "0.32.0",
            "measured_at": "2026-11-25T15:22:00Z",
            "levels": [
                {"concurrency": 1, "draft_cost": 0.02, "draft_cost_low": 0.0, "draft_cost_high": 0.05,
                 "break_even": 0.02, "best_k": 4},
                {"concurrency": 4, "draft_cost": 0.1, "draft_cost_low": 0.06, "draft_cost_high": 0.15,
                 "break_even": 0.1, "best_k": 2},
                {"concurrency": 16, "draft_cost": 1.3, "draft_cost_low": 0.9, "draft_cost_high": 1.8,
                 "break_even": 1.0, "best_k": 0},
            ],
        }
    },
}
MODEL = 'models["tiny-target"]'
TEMP_0 = {"temperature": 0, "draft_cost": 0.01, "draft_cost_low": 0.0, "draft_cost_high": 0.03, "break_even": 0.01}
TEMP_1 = {"temperature": 1, "draft_cost": 2.5, "draft_cost_low": 1.5, "draft_cost_high": 4.0, "break_even": 1.0}


def edited(path: str, value: object = None, delete: bool = False) -> dict:
    """A copy of GOOD with one field (dotted path, list indices as numbers) set or removed."""
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node: object = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]  # type: ignore[index]
    key = int(last) if isinstance(node, list) else last
    if delete:
        del node[key]  # type: ignore[index, arg-type]
    else:
        node[key] = value  # type: ignore[index]
    return data


def rejection(data: object) -> str:
    with pytest.raises(CalibrationError) as info:
        parse(data)
    message = str(info.value)
    assert "\n" not in message and message.startswith("calibration: ")
    return message


def test_good_file_parses_to_the_typed_form():
    cal = parse(GOOD)
    m = cal.models["tiny-target"]
    assert (m.model, m.method, m.k, m.vllm_version, m.measured_at) == (
        "tiny-target", "ngram", 4, "0.32.0", "2026-11-25T15:22:00Z")
    assert m.levels[1] == Level(4.0, 0.1, 0.06, 0.15, 0.1, 2)
    assert isinstance(m.levels[0].concurrency, float) and cal.source_path is None
    assert parse(edited("models.tiny-target.vllm_version", None)).models["tiny-target"].vllm_version is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (edited("schema", "specdec-calibration/3"),
         'calibration: schema: must be one of "specdec-calibration/1", "specdec-calibration/2" (the versions this '
         'sidecar reads), got "specdec-calibration/3"'),
        (edited("schema", delete=True), 'calibration: schema: missing (expected "specdec-calibration/2")'),
        (edited("models", delete=True), "calibration: models: missing"),
        (edited("models", {}), "calibration: models: must be an object naming at least one model, got an object"),
        (edited("models.tiny-target.levels", delete=True), f"calibration: {MODEL}.levels: missing"),
        (edited("models.tiny-target.levels", []), f"calibration: {MODEL}.levels: must be a list of at least one"),
        (edited("models.tiny-target.levels.1.draft_cost", float("nan")),
         f"calibration: {MODEL}.levels[1].draft_cost: must be a finite number >= 0, got NaN"),
        (edited("models.tiny-target.levels.1.draft_cost", float("inf")),
         f"calibration: {MODEL}.levels[1].draft_cost: must be a finite number >= 0, got Infinity"),
        (edited("models.tiny-target.levels.0.draft_cost", -0.01),
         f"calibration: {MODEL}.levels[0].draft_cost: must be a finite number >= 0, got -0.01"),
        (edited("models.tiny-target.levels.0.draft_cost", "0.1"),
         f'calibration: {MODEL}.levels[0].draft_cost: must be a finite number >= 0, got "0.1"'),
        (edited("models.tiny-target.levels.1.draft_cost_low", 0.12),
         f"calibration: {MODEL}.levels[1].draft_cost_low: must be <= draft_cost (0.1)"),
        (edited("models.tiny-target.levels.1.draft_cost_high", 0.09),
         f"calibration: {MODEL}.levels[1].draft_cost_high: must be >= draft_cost (0.1)"),
        (edited("models.tiny-target.levels.1.break_even", 0.5),
         f"calibration: {MODEL}.levels[1].break_even: must be draft_cost held to 0..1 (0.1), got 0.5"),
        (edited("models.tiny-target.k", 2.5), f"calibration: {MODEL}.k: must be an integer >= 1, got 2.5"),
        (edited("models.tiny-target.k", -1), f"calibration: {MODEL}.k: must be an integer >= 1, got -1"),
        (edited("models.tiny-target.k", True), f"calibration: {MODEL}.k: must be an integer >= 1, got true"),
        (edited("models.tiny-target.levels.0.best_k", -1),
         f"calibration: {MODEL}.levels[0].best_k: must be an integer from 0 to k (4), got -1"),
        (edited("models.tiny-target.levels.0.best_k", 5),
         f"calibration: {MODEL}.levels[0].best_k: must be an integer from 0 to k (4), got 5"),
        (edited("models.tiny-target.levels.0.best_k", 1.0),
         f"calibration: {MODEL}.levels[0].best_k: must be an integer from 0 to k (4), got 1.0"),
        (edited("models.tiny-target.levels.1.concurrency", 16),
         f"calibration: {MODEL}.levels[2].concurrency: must be above levels[1].concurrency (16)"),
        (edited("models.tiny-target.levels.1.concurrency", 1),
         f"calibration: {MODEL}.levels[1].concurrency: must be above levels[0].concurrency (1)"),
        (edited("models.tiny-target.levels.0.concurrency", 0),
         f"calibration: {MODEL}.levels[0].concurrency: must be a finite number > 0, got 0"),
        (edited("models.tiny-target.method", ""), f"calibration: {MODEL}.method: must be a non-empty string"),
        (edited("models.tiny-target.method", delete=True), f"calibration: {MODEL}.method: missing"),
        (edited("models.tiny-target.measured_at", "yesterday"),
         f"calibration: {MODEL}.measured_at: must be an ISO 8601 time"),
        (edited("models.tiny-target.measured_at", "2026-11-25T15:22:00"),
         f"calibration: {MODEL}.measured_at: must carry its UTC offset"),
        (edited("models.tiny-target.vllm_version", delete=True), f"calibration: {MODEL}.vllm_version: missing"),
        (edited("models.tiny-target.levels.0.draft_cots", 0.1),
         f"calibration: {MODEL}.levels[0].draft_cots: unknown field"),
        (edited("models.tiny-target.levels.0.by_temperature", {"0": 0.1}),
         f"calibration: {MODEL}.levels[0].by_temperature: must be a list of per-temperature costs"),
        (edited("models.tiny-target.levels.0.by_temperature", [dict(TEMP_0, temperature=-1)]),
         f"calibration: {MODEL}.levels[0].by_temperature[0].temperature: must be a finite number >= 0, got -1"),
        (edited("models.tiny-target.levels.0.by_temperature", [TEMP_0, TEMP_0]),
         f"calibration: {MODEL}.levels[0].by_temperature[1].temperature: must be above "
         "by_temperature[0].temperature (0): sorted, each once"),
        (edited("models.tiny-target.levels.0.by_temperature", [dict(TEMP_0, draft_cost=float("nan"))]),
         f"calibration: {MODEL}.levels[0].by_temperature[0].draft_cost: must be a finite number >= 0, got NaN"),
        (edited("models.tiny-target.levels.0.by_temperature", [dict(TEMP_0, break_even=0.9)]),
         f"calibration: {MODEL}.levels[0].by_temperature[0].break_even: must be draft_cost held to 0..1"),
        (edited("models.tiny-target.levels.0.by_temperature", [dict(TEMP_0, cost=1)]),
         f"calibration: {MODEL}.levels[0].by_temperature[0].cost: unknown field"),
        # a schema 1 file has no per-temperature costs: one that carries them was not written by measure
        (dict(edited("models.tiny-target.levels.0.by_temperature", [TEMP_0]), schema="specdec-calibration/1"),
         f"calibration: {MODEL}.levels[0].by_temperature: unknown field"),
        (edited("models.tiny-target.levels.0", "fast"),
         f'calibration: {MODEL}.levels[0]: must be an object (one load level), got "fast"'),
        ([GOOD], "calibration: must be an object"),
    ],
)
def test_each_rejection_is_one_line_naming_the_field(data, expected):
    assert rejection(data).startswith(expected)


def test_the_where_prefix_names_the_source():
    with pytest.raises(CalibrationError, match=r"^/etc/cal.json: schema: missing"):
        parse(edited("schema", delete=True), where="/etc/cal.json")


def test_load_reads_a_file_and_reports_unreadable_and_bad_json_in_one_line(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(GOOD))
    cal = load(path)
    assert cal.source_path == str(path) and cal.models["tiny-target"].k == 4
    cases = {
        tmp_path / "missing.json": "cannot read: No such file or directory",
        tmp_path / "broken.json": "not JSON (Expecting value at line 1 column 12)",
        tmp_path / "nan.json": "levels[0].draft_cost: must be a finite number >= 0, got NaN",
    }
    (tmp_path / "broken.json").write_text('{"schema": ')
    (tmp_path / "nan.json").write_text(json.dumps(GOOD).replace('"draft_cost": 0.02', '"draft_cost": NaN'))
    for bad, reason in cases.items():
        with pytest.raises(CalibrationError) as info:
            load(bad)
        assert str(info.value).startswith(f"calibration {bad}: ") and reason in str(info.value)
        assert "\n" not in str(info.value)


def test_dumps_round_trips_and_refuses_to_write_a_bad_calibration():
    cal = parse(GOOD)
    text = dumps(cal)
    assert parse(json.loads(text)) == cal
    assert json.loads(text) == GOOD  # the same numbers and names that were read
    bad = Calibration({"m": ModelCalibration("m", "ngram", 4, (Level(1, math.nan, 0, 1, 0, 1),), None,
                                             "2026-11-25T15:22:00+00:00")})
    with pytest.raises(CalibrationError, match=r'models\["m"\].levels\[0\].draft_cost'):
        dumps(bad)


def test_draft_cost_interpolates_linearly_and_clamps_at_the_ends():
    m = parse(GOOD).models["tiny-target"]
    assert m.draft_cost_at(0) == m.draft_cost_at(1) == 0.02  # below the first level: the first level's c
    assert m.draft_cost_at(2.5) == pytest.approx(0.02 + 0.5 * (0.1 - 0.02))
    assert m.draft_cost_at(4) == pytest.approx(0.1)
    assert m.draft_cost_at(10) == pytest.approx(0.1 + 0.5 * (1.3 - 0.1))
    assert m.draft_cost_at(16) == m.draft_cost_at(1000) == m.draft_cost_at(math.inf) == 1.3
    assert m.break_even_at(10) == pytest.approx(0.7) and m.break_even_at(100) == 1.0  # c held to 0..1
    with pytest.raises(ValueError):
        m.draft_cost_at(math.nan)


def test_best_k_is_the_level_at_or_below_the_load():
    m = parse(GOOD).models["tiny-target"]
    assert [m.best_k_at(x) for x in (0, 1, 3.9, 4, 15, 16, 500)] == [4, 4, 4, 2, 2, 0, 0]


def test_one_level_is_enough_and_is_used_at_every_load():
    data = edited("models.tiny-target.levels", [GOOD["models"]["tiny-target"]["levels"][1]])
    m = parse(data).models["tiny-target"]
    assert m.draft_cost_at(1) == m.draft_cost_at(64) == 0.1 and m.best_k_at(1) == m.best_k_at(64) == 2


def test_calibration_is_immutable():
    cal = parse(GOOD)
    with pytest.raises(TypeError):
        cal.models["other"] = cal.models["tiny-target"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        cal.models["tiny-target"].k = 2  # type: ignore[misc]


def test_schema_1_files_still_read():
    old = parse(dict(GOOD, schema="specdec-calibration/1")).models["tiny-target"]
    assert old == parse(GOOD).models["tiny-target"] and all(not lv.by_temperature for lv in old.levels)


def test_a_bucket_is_judged_by_the_costs_of_the_temperatures_it_holds():
    """Per-temperature costs, where a level has them, for the temperatures a bucket's test picks (their mean);
    the level's c for a bucket with none measured, for a level without any, and without a test."""
    data = edited("models.tiny-target.levels.0.by_temperature", [TEMP_0, TEMP_1])
    data["models"]["tiny-target"]["levels"][1]["by_temperature"] = [dict(TEMP_0, draft_cost=0.05, draft_cost_high=0.08,
                                                                             break_even=0.05)]
    m = parse(data).models["tiny-target"]
    greedy, hot, mid = (lambda t: t == 0), (lambda t: 0.7 < t <= 1.0), (lambda t: 0.3 < t <= 0.5)
    assert m.measured_temperatures() == (0.0, 1.0)
    assert m.draft_cost_at(1, greedy) == pytest.approx(0.01) and m.draft_cost_at(1, hot) == pytest.approx(2.5)
    assert m.draft_cost_at(1, mid) == m.draft_cost_at(1) == pytest.approx(0.02)
    assert m.draft_cost_at(4, greedy) == pytest.approx(0.05)
    assert m.draft_cost_at(4, hot) == pytest.approx(0.1)  # level 4 measured no hot temperature: its own c
    assert m.draft_cost_at(2.5, greedy) == pytest.approx(0.01 + 0.5 * (0.05 - 0.01))
    assert m.draft_cost_at(2.5, hot) == pytest.approx(2.5 + 0.5 * (0.1 - 2.5))
    both = m.levels[0].draft_cost_for(lambda t: t in (0, 1))
    assert both == pytest.approx((0.01 + 2.5) / 2)
    assert parse(json.loads(dumps(Calibration({"tiny-target": m})))).models["tiny-target"] == m


def test_the_demos_calibration_is_for_the_demos_server():
    """devstack/'s recorded calibration loads, and is for what `make demo` serves: the tiny target with n-gram
    drafting, k = 4 (tools/demo.py), with each measured temperature's own cost."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    demo = (root / "tools" / "demo.py").read_text()
    assert 'ROOT / "devstack" / "tiny-target-ngram-k4.calibration.json"' in demo and "ngram_config(k=4)" in demo
    m = load(root / "devstack" / "tiny-target-ngram-k4.calibration.json").models["tiny-target"]
    assert (m.method, m.k) == ("ngram", 4) and m.measured_temperatures() == (0.0, 1.0)
