import math

import pytest

from sidecar.buckets import TemperatureBuckets


@pytest.mark.parametrize(
    ("temperature", "label"),
    [(0, "0"), (0.0, "0"), (0.2, "0-0.3"), (0.3, "0-0.3"), (0.31, "0.3-0.5"), (0.5, "0.3-0.5"), (0.7, "0.5-0.7"),
     (0.8, "0.7-1.0"), (1, "0.7-1.0"), (1.0001, "gt1.0"), (2, "gt1.0"), (-0.1, "invalid"), ("0.5", "invalid"),
     (True, "invalid"), (math.nan, "invalid"), (math.inf, "invalid"), ([1], "invalid")],
)
def test_default_buckets(temperature, label):
    buckets = TemperatureBuckets()
    assert buckets.bucket(temperature) == label
    assert label in buckets.labels


def test_omitted_and_null_use_default_bucket_or_configured_temperature():
    assert TemperatureBuckets().bucket(None, present=False) == "default"
    assert TemperatureBuckets().bucket(None, present=True) == "default"  # JSON null: vLLM applies its default
    assert TemperatureBuckets(omitted_as=1.0).bucket(None, present=False) == "0.7-1.0"
    assert "default" not in TemperatureBuckets(omitted_as=1.0).labels


@pytest.mark.parametrize("edges", [(), (0.5, 0.3), (0.0, 1.0), (float("nan"),), (0.3, 0.3)])
def test_bad_edges(edges):
    with pytest.raises(ValueError):
        TemperatureBuckets(edges)


def test_integer_beyond_any_float_is_the_top_bucket_not_a_crash():
    buckets = TemperatureBuckets()
    assert buckets.bucket(10**400) == "gt1.0"
    assert buckets.bucket(-(10**400)) == "invalid"
