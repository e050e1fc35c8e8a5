"""The calibration as a source: ``--calibration FILE`` re-read when it changes, on its own clock.

A Kubernetes ConfigMap mounted as a volume is updated by swapping a symlink, so the file's bytes are compared
(the file is small), not only its modification time. A new file that does not validate is logged once as
``calibration_rejected`` with the one-line reason, counted in ``specdec_calibration_reload_errors_total``,
and changes nothing: the previous calibration (or none) stays in force. The file was validated when the
settings were built, so the sidecar never starts with a bad one.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter

from sidecar.calibration import Calibration, CalibrationError, parse

log = structlog.get_logger("sidecar.calibration")


class CalibrationSource:
    def __init__(self, path: str | None, registry: CollectorRegistry, interval: float = 5.0) -> None:
        self.path = path
        self._interval = interval
        self._seen: bytes | None = None
        self.state: Calibration | None = None
        self.errors = Counter(
            "specdec_calibration_reload_errors",
            "Changed --calibration files that were rejected (the previous calibration stays in force).",
            registry=registry,
        )
        if path is not None:
            self.check()

    def check(self) -> bool:
        """Re-read the file; True when a new calibration took effect. Never raises."""
        if self.path is None:
            return False
        try:
            data = Path(self.path).read_bytes()
        except OSError as error:
            if self._seen != b"":  # log a vanished file once, keep what was loaded
                log.warning("calibration_unreadable", path=self.path, error=error.strerror or str(error))
                self.errors.inc()
            self._seen = b""
            return False
        if data == self._seen:
            return False
        self._seen = data
        try:
            calibration = parse(json.loads(data), where=self.path)
        except (CalibrationError, ValueError) as error:  # ValueError: JSON that does not decode
            message = str(error) if isinstance(error, CalibrationError) else f"{self.path}: not JSON: {error}"
            log.warning("calibration_rejected", path=self.path, error=message,
                        kept="previous" if self.state is not None else "default thresholds")
            self.errors.inc()
            return False
        self.state = calibration
        log.info("calibration_loaded", path=self.path, models=sorted(calibration.models))
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.check()
