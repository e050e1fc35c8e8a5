"""Start and stop a real local vLLM server (the CPU build) for the demo, the fixture captures and the tests.

vLLM runs in its own virtualenv (``VLLM_PYTHON`` or ``.venv-vllm/bin/python``): its pins must not decide the
sidecar's dependencies. The server binds to 127.0.0.1 on a free port, with no model hub (offline, local
model directory), and is always stopped with its whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = REPO / "models"


def vllm_python() -> Path:
    return Path(os.environ.get("VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class VllmServer:
    """A vLLM OpenAI-compatible server on loopback. Use as a context manager."""

    model: Path = DEFAULT_MODELS / "tiny-target"
    served_name: str = "tiny-target"
    speculative: dict | None = None
    per_request_metrics: bool = True
    force_include_usage: bool = True
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    log_path: Path | None = None
    startup_timeout: float = 300.0
    max_model_len: int = 512
    max_num_seqs: int = 32
    # False: vLLM's queue readers wait without spinning (no_busy_poll/), for two servers sharing a small machine
    busy_poll: bool = True
    _proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model),
            "--served-model-name", self.served_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--dtype", "float32",
            "--seed", "0",
        ]  # fmt: skip
        if self.speculative is not None:
            cmd += ["--speculative-config", json.dumps(self.speculative)]
            if self.per_request_metrics:
                cmd += ["--per-request-spec-decode-metrics", "summary"]
        if self.force_include_usage:
            cmd += ["--enable-force-include-usage"]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """The server's environment: this process's, offline, quiet, and the no-busy-poll hook if asked for."""
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            VLLM_LOGGING_LEVEL=env.get("VLLM_LOGGING_LEVEL", "WARNING"),
        )
        if not self.busy_poll:
            hook = str(Path(__file__).resolve().parent / "no_busy_poll")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (hook, env.get("PYTHONPATH")) if p)
        return env

    def start(self) -> VllmServer:
        if not self.port:
            self.port = free_port()
        env = self.environment()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self._proc.returncode} during start-up (log: {self.log_path})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM not healthy within {self.startup_timeout:.0f}s (log: {self.log_path})")

    def stop(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Engine-core children share the process group; make sure none outlives the server.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def draft_model_config(draft: Path = DEFAULT_MODELS / "tiny-draft", k: int = 4) -> dict:
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}


def ngram_config(k: int = 4) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def post_json(url: str, payload: dict, timeout: float = 120.0) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def get_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()
