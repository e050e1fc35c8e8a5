"""Run a real Prometheus and Alertmanager on loopback with the project's rule files (demo and live tests).

The shipped files are used as they are, except: rate windows become ``fast_window`` and every ``for:``
becomes ``fast_for`` (so a break-even page shows within a minute), and the Alertmanager config's PagerDuty
and webhook URLs point wherever the caller says, with grouping shortened.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devstack.vllm_server import REPO, free_port

ALERTS_DIR = REPO / "alerts"


def find_binary(*names: str) -> str | None:
    for name in names:
        if path := shutil.which(name):
            return path
    return None


def shorten_rules(text: str, window: str = "30s", for_: str = "5s") -> str:
    text = re.sub(r"\[5m\]", f"[{window}]", text)
    return re.sub(r"for: \d+m", f"for: {for_}", text)


class LoopbackPrometheus:
    """A real Prometheus on loopback scraping sidecars (job ``specdec-sidecar``, one target a pod, labelled
    with *namespace* and the pod's name) and evaluating copies of the shipped rule files, each passed through
    *rewrite* (shorter windows and ``for:`` for a test)."""

    def __init__(self, workdir: Path, targets: dict[str, int], rewrite: Callable[[str], str], namespace: str) -> None:
        import yaml  # test/demo extra, not needed by the sidecar itself

        binary = find_binary("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (make system-deps)")
        workdir.mkdir(parents=True, exist_ok=True)
        rules = []
        for name in ("recording-rules.yaml", "alerts.yaml"):
            copy = workdir / name
            copy.write_text(rewrite((ALERTS_DIR / name).read_text()))
            rules.append(str(copy))
        self.port = free_port()
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": rules,
            "scrape_configs": [{
                "job_name": "specdec-sidecar",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": namespace, "pod": pod}}
                                   for pod, port in targets.items()],
            }],
        }))
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "ab"), start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return body["data"]["result"]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("prometheus not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class AlertingStack:
    workdir: Path
    targets: list[str]
    pagerduty_url: str
    webhook_url: str
    routing_key: str = "demo-routing-key"
    namespace: str = "demo"
    fast_window: str = "30s"
    fast_for: str = "5s"
    prometheus_port: int = 0
    alertmanager_port: int = 0
    _procs: list[subprocess.Popen] = field(default_factory=list)

    @staticmethod
    def available() -> bool:
        return bool(find_binary("prometheus") and find_binary("prometheus-alertmanager", "alertmanager"))

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    def write_configs(self) -> None:
        import yaml  # test/demo extra, not needed by the sidecar itself

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prometheus_port = self.prometheus_port or free_port()
        self.alertmanager_port = self.alertmanager_port or free_port()
        rules = []
        for name in ("recording-rules.yaml", "alerts.yaml"):
            copy = self.workdir / name
            copy.write_text(shorten_rules((ALERTS_DIR / name).read_text(), self.fast_window, self.fast_for))
            rules.append(str(copy))
        key_file = self.workdir / "pagerduty-routing-key"
        key_file.write_text(self.routing_key + "\n")
        am = yaml.safe_load((ALERTS_DIR / "alertmanager.yml").read_text())
        am["route"].update(group_wait="1s", group_interval="2s", repeat_interval="1h")
        for receiver in am["receivers"]:
            for pd in receiver.get("pagerduty_configs", []):
                pd["routing_key_file"] = str(key_file)
                pd["url"] = self.pagerduty_url
            for hook in receiver.get("webhook_configs", []):
                hook["url"] = self.webhook_url
        (self.workdir / "alertmanager.yml").write_text(yaml.safe_dump(am))
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": rules,
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.alertmanager_port}"]}]}]},
            "scrape_configs": [{
                "job_name": "specdec-sidecar",
                "static_configs": [{"targets": self.targets, "labels": {"namespace": self.namespace}}],
            }],
        }))

    def start(self, timeout: float = 60.0) -> AlertingStack:
        prometheus = find_binary("prometheus")
        alertmanager = find_binary("prometheus-alertmanager", "alertmanager")
        if not (prometheus and alertmanager):
            raise FileNotFoundError("prometheus and prometheus-alertmanager are not installed")
        self.write_configs()
        d = self.workdir
        self._procs.append(subprocess.Popen(
            [alertmanager, f"--config.file={d / 'alertmanager.yml'}", f"--storage.path={d / 'am-data'}",
             f"--web.listen-address=127.0.0.1:{self.alertmanager_port}", "--cluster.listen-address="],
            stdout=subprocess.DEVNULL, stderr=open(d / "alertmanager.log", "ab"), start_new_session=True))
        self._procs.append(subprocess.Popen(
            [prometheus, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.prometheus_port}"],
            stdout=subprocess.DEVNULL, stderr=open(d / "prometheus.log", "ab"), start_new_session=True))
        deadline = time.monotonic() + timeout
        for url in (self.alertmanager_url + "/-/ready", self.prometheus_url + "/-/ready"):
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2):
                        break
                except (urllib.error.URLError, OSError):
                    if time.monotonic() > deadline:
                        self.stop()
                        raise TimeoutError(f"{url} not ready; logs in {d}") from None
                    time.sleep(0.3)
        return self

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._procs.clear()

    def __enter__(self) -> AlertingStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
