"""The one compiled part: the tap's per-read scan (sidecar/tap/_scan.c). Optional: where it cannot be built,
the package installs without it and sidecar/tap/observe.py uses its Python twin."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sidecar.tap._scan", ["sidecar/tap/_scan.c"], optional=True)])
