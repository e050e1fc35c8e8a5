"""Local stacks for the demo, the tests and the benchmarks (vLLM, Prometheus, Alertmanager on loopback).

Not part of what runs in a pod: the wheel and the container image do not include this package.
"""
