"""The text-format reader: edge cases of the format, and agreement with prometheus_client's parser."""

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.upstream.exposition import parse, parse_value

WANTED = {"vllm:a_total", "vllm:g", "vllm:info"}


def one(text: str):
    result = parse(text, WANTED)
    assert len(result.samples) == 1, result
    return result.samples[0]


def test_plain_and_labelled_samples_with_help_type_and_unknown_families():
    text = (
        "# HELP vllm:a_total Some help with \\\\ and \\n escapes.\n"
        "# TYPE vllm:a_total counter\n"
        'vllm:a_total{engine="0",model_name="m"} 12.0\n'
        "vllm:unknown_total 3\n"
        "python_gc_objects_collected_total{generation=\"0\"} 1.0\n"
        "vllm:g 0.25\n"
    )
    result = parse(text, WANTED)
    assert [(s.name, s.labels, s.value) for s in result.samples] == [
        ("vllm:a_total", (("engine", "0"), ("model_name", "m")), 12.0),
        ("vllm:g", (), 0.25),
    ]
    assert result.invalid_lines == 0


def test_escaped_label_values_and_braces_inside_quotes():
    s = one('vllm:info{a="x\\"y",b="c\\\\d",c="line\\nbreak",d="}{,="} 1\n')
    assert s.labels == (("a", 'x"y'), ("b", "c\\d"), ("c", "line\nbreak"), ("d", "}{,="))


def test_trailing_comma_whitespace_and_timestamp():
    s = one('vllm:a_total{engine="1", model_name="m",} 7 1700000000000\n')
    assert s.labels == (("engine", "1"), ("model_name", "m"))
    assert s.value == 7.0


@pytest.mark.parametrize(
    ("token", "expected"),
    [("NaN", math.nan), ("+Inf", math.inf), ("-Inf", -math.inf), ("1e3", 1000.0), ("-0.5", -0.5)],
)
def test_special_values(token, expected):
    value = parse_value(token)
    assert (math.isnan(value) and math.isnan(expected)) or value == expected


@pytest.mark.parametrize(
    "line",
    [
        'vllm:a_total{engine="0" 12',  # unterminated label set
        'vllm:a_total{engine="0} 12',  # unterminated value
        "vllm:a_total{engine=0} 12",  # unquoted
        'vllm:a_total{engine="0"} twelve',
        'vllm:a_total{engine="0"} 1_000',
        'vllm:a_total{engine="0"} 1 2 3',
        "vllm:a_total",
        'vllm:a_total{9bad="x"} 1',
    ],
)
def test_garbage_lines_are_counted_and_skipped_not_raised(line):
    result = parse(f'{line}\nvllm:g 1\n', WANTED)
    assert [s.name for s in result.samples] == ["vllm:g"]
    assert result.invalid_lines == 1


def test_truncated_and_binary_garbage_does_not_raise():
    text = 'vllm:g 1\n\x00\xff\ufffd{{{"\nvllm:a_total{engine="0",model'
    result = parse(text, WANTED)
    assert [s.name for s in result.samples] == ["vllm:g"]


def test_crlf_line_endings():
    result = parse("vllm:g 1\r\nvllm:a_total 2\r\n", WANTED)
    assert [s.value for s in result.samples] == [1.0, 2.0]


def test_agrees_with_prometheus_client_on_real_captures(vllm_exposition):
    wanted = {
        "vllm:spec_decode_num_drafts_total",
        "vllm:spec_decode_num_accepted_tokens_per_pos_total",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
    }
    ours = {(s.name, s.labels, s.value) for s in parse(vllm_exposition, wanted).samples}
    theirs = set()
    for family in text_string_to_metric_families(vllm_exposition):
        for sample in family.samples:
            if sample.name in wanted:
                theirs.add((sample.name, tuple(sorted(sample.labels.items())), sample.value))
    assert {(n, tuple(sorted(l)), v) for n, l, v in ours} == theirs
    assert len(theirs) >= 6
