"""The container image, built and run for real without a registry or a container daemon:

1. two Debian bookworm bases made by ``mmdebstrap`` and imported with ``podman import``: the final stage's
   (python3 3.11 + venv) and the builder's (the same plus gcc, libc6-dev and python3-dev), cached as
   .cache/image/debian-bookworm-python3{,-build}.tar (a fresh clone builds them);
2. ``make image`` with those bases and ``IMAGE_SOURCE=wheelhouse``: the dependencies downloaded on the host
   into the wheelhouse, then ``buildah bud --isolation chroot`` of the Containerfile, whose builder stage
   compiles the project's wheel (C scan included) with the base's own Python and no index;
3. ``buildah run --isolation chroot`` of ``specdec-sidecar serve`` in the built image against a loopback
   upstream that replays real vLLM 0.32 captures; the host reads the sidecar's /metrics and sends a completion
   through its proxy.

Needs root (chroot isolation, mmdebstrap's root mode) and the Debian packages that ``make system-deps``
installs; skips with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from fakes import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "image"
BASE_TAR = CACHE / "debian-bookworm-python3.tar"
BUILDER_TAR = CACHE / "debian-bookworm-python3-build.tar"
BASE_PACKAGES = "python3,python3-venv"
BUILDER_PACKAGES = BASE_PACKAGES + ",python3-dev,gcc,libc6-dev"
IMAGE = "localhost/specdec-sidecar:test"
TOOLS = ("mmdebstrap", "buildah", "podman")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mmdebstrap root mode, buildah chroot isolation)"
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        return (
            f"{', '.join(missing)} not installed (make system-deps installs mmdebstrap buildah podman uidmap)"
        )
    info = subprocess.run(["buildah", "info"], capture_output=True, text=True, timeout=60, check=False)
    if info.returncode != 0:
        return (
            f"buildah cannot run here: {info.stderr.strip().splitlines()[-1] if info.stderr.strip() else '?'}"
        )
    return None


REASON = _why_not()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def sh(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw, check=False)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def base_image(tarball: Path = BASE_TAR, packages: str = BASE_PACKAGES) -> str:
    """A Debian base with *packages* as a local image, built with mmdebstrap unless the cached tarball exists."""
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")
        started = time.monotonic()
        sh(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                f"--include={packages}",
                '--aptopt=Acquire::Languages "none"',
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                "bookworm",
                str(partial),
            ],
            timeout=900,
        )
        partial.rename(tarball)
        print(f"mmdebstrap built {tarball.name} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    digest = hashlib.sha256()
    with tarball.open("rb") as tar:
        for block in iter(lambda: tar.read(1 << 20), b""):
            digest.update(block)
    tag = f"localhost/specdec-test-base:{digest.hexdigest()[:12]}"
    exists = subprocess.run(["podman", "image", "exists", tag], timeout=60, check=False)
    if exists.returncode != 0:
        sh(["podman", "import", "--quiet", str(tarball), tag], timeout=300)
    return tag


@pytest.fixture(scope="module")
def image() -> dict:
    """Build the image with `make image` (offline: IMAGE_SOURCE=wheelhouse) on the mmdebstrap bases; returns its
    OCI config."""
    base = base_image()
    builder = base_image(BUILDER_TAR, BUILDER_PACKAGES)
    before = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", IMAGE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.strip()
    started = time.monotonic()
    # -o: never (re)create the virtualenv from here; the one running the tests builds the wheelhouse.
    sh(
        [
            "make",
            "--no-print-directory",
            "-o",
            ".venv/.installed",
            "image",
            f"IMAGE={IMAGE}",
            f"IMAGE_BASE={base}",
            f"IMAGE_BUILDER_BASE={builder}",
            "IMAGE_SOURCE=wheelhouse",
            f"BIN={Path(sys.executable).parent}",
            "IMAGE_BUILD=buildah bud --isolation chroot --layers=false",
        ],
        timeout=900,
        cwd=ROOT,
    )
    print(f"make image took {time.monotonic() - started:.0f} s", file=sys.stderr)
    inspect = json.loads(sh(["buildah", "inspect", "--type", "image", IMAGE], timeout=60).stdout)
    if before and before != inspect["FromImageID"]:
        # the previous build of this tag, now untagged: do not let repeated runs pile up images
        gone = subprocess.run(
            ["podman", "rmi", before], capture_output=True, text=True, timeout=120, check=False
        )
        if gone.returncode != 0:
            print(
                f"could not remove the previous image {before[:12]}: {gone.stderr.strip()}", file=sys.stderr
            )
    return inspect["OCIv1"]["config"]


@pytest.fixture
def container(image):
    name = f"specdec-test-{os.getpid()}-{time.monotonic_ns()}"
    sh(["buildah", "from", "--name", name, IMAGE], timeout=120)
    yield name
    subprocess.run(["buildah", "umount", name], capture_output=True, timeout=60, check=False)
    subprocess.run(["buildah", "rm", name], capture_output=True, timeout=60, check=False)


@pytest.mark.timeout(1500)
def test_image_config(image, container):
    assert image["Entrypoint"] == ["specdec-sidecar"]
    assert image["Cmd"] == ["serve"]
    assert image["User"] == "65532:65532"  # numeric: Kubernetes can enforce runAsNonRoot
    assert {"8080/tcp", "9464/tcp"} <= set(image.get("ExposedPorts", {}))
    root = Path(sh(["buildah", "mount", container], timeout=60).stdout.strip())
    site = next((root / "opt" / "specdec-sidecar" / "lib").glob("python3*/site-packages"))
    assert (site / "sidecar" / "cli.py").exists()
    assert list((site / "sidecar" / "tap").glob("_scan.cpython-*.so")), "the tap's C scan is built into the image"
    assert not (site / "devstack").exists(), "devstack/ is not part of the product"
    assert not (root / "tmp" / "wheels").exists(), "the wheelhouse stays in the build stage"
    assert not (root / "src").exists() and not (root / "tmp" / "dist").exists(), "sources stay in the builder"
    # slim: the builder's compiler and headers stay behind
    assert not (root / "usr" / "bin" / "gcc").exists() and not list((root / "usr" / "include").glob("python3*"))
    assert not list((root / "opt" / "specdec-sidecar" / "bin").glob("pip*")), "no pip in the runtime image"
    # bytecode compiled at build time: a read-only root filesystem needs no __pycache__ writes
    assert list((site / "sidecar").glob("__pycache__/cli.*.pyc"))


@pytest.mark.timeout(1500)
async def test_sidecar_runs_in_the_image_against_a_loopback_upstream(image, container, upstream):
    metrics_port, proxy_port = free_port(), free_port()
    cmd = [
        "buildah",
        "run",
        "--isolation",
        "chroot",
        container,
        "--",
        "specdec-sidecar",
        "serve",
        f"--upstream={upstream.url}",
        "--metrics-host=127.0.0.1",
        f"--metrics-port={metrics_port}",
        "--proxy-host=127.0.0.1",
        f"--proxy-port={proxy_port}",
        "--scrape-interval=0.5s",
        "--windows=10m",
        "--verdict-window=10m",
        "--min-drafts=1",
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    text = ""
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, f"http://127.0.0.1:{metrics_port}", timeout=60, proc=proc)
            # the process inside the image runs as the image's non-root user
            uids = _uids_of(f"--metrics-port={metrics_port}")
            assert uids and all(uid == 65532 for uid in uids), uids
            # a completion through the proxy in the image, answered by the replayed vLLM capture
            body = {"model": "tiny-target", "prompt": "def f(", "max_tokens": 16, "temperature": 0}
            async with session.post(f"http://127.0.0.1:{proxy_port}/v1/completions", json=body) as resp:
                assert resp.status == 200
                answer = await resp.json()
            assert answer["metrics"]["speculative_decoding"]["num_draft_tokens"] > 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                    text = await resp.text()
                if "specdec_upstream_up 1.0" in text and "specdec_request_accepted_tokens_total{" in text:
                    break
                await asyncio.sleep(0.5)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert "specdec_upstream_up 1.0" in text
    assert 'specdec_build_info{version="' in text
    samples = _samples(text)
    # read from the replayed vLLM /metrics capture (KV cache size from cache_config_info) ...
    assert samples.get(("specdec_kv_cache_capacity_tokens", (("model", "tiny-target"),)), 0) > 0
    # ... and from the completion that went through the proxy, with vLLM's per-request acceptance
    assert (
        samples[
            (
                "specdec_requests_total",
                (("model", "tiny-target"), ("status_class", "2xx"), ("temperature_bucket", "0")),
            )
        ]
        == 1
    )
    accepted = answer["metrics"]["speculative_decoding"]["num_accepted_draft_tokens"]
    assert (
        samples[
            (
                "specdec_request_accepted_tokens_total",
                (("model", "tiny-target"), ("source", "vllm"), ("temperature_bucket", "0")),
            )
        ]
        == accepted
    )
    assert not _uids_of(f"--metrics-port={metrics_port}"), "the sidecar outlived `buildah run`"
    # nothing was written to the root filesystem (readOnlyRootFilesystem in the pod): the container's own
    # layer holds only what buildah itself puts there for a run
    root = Path(sh(["buildah", "mount", container], timeout=60).stdout.strip())
    written = sorted(str(p.relative_to(root.parent / "diff")) for p in (root.parent / "diff").rglob("*"))
    assert set(written) <= {
        "etc",
        "etc/hosts",
        "etc/resolv.conf",
        "etc/hostname",
        "run",
        "run/.containerenv",
    }, written


def _samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _uids_of(marker: str) -> list[int]:
    """Real UIDs of the processes whose command line contains *marker* (our sidecar inside `buildah run`)."""
    uids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if (
                marker.encode() in cmdline
                and b"specdec-sidecar" in b" ".join(cmdline)
                and not cmdline[0].endswith(b"buildah")
            ):
                status = (proc / "status").read_text()
                uids.append(
                    int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
                )
        except (OSError, StopIteration):
            continue
    return uids
