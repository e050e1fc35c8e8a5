"""Rendering for Prometheus: collectors that turn immutable snapshots into metric families."""
