"""Self-checks of the GPU scripts: named pass/fail results that go into their JSON.

A device run is one call with no second chance to look, so each script checks its own results
(rows counted, throughputs finite and positive, the device's codes or selections equal to the CPU
path's) and exits non-zero when one fails. The JSON keeps every check with its measured value and
what was expected, under ``"checks"``.

Example:
    >>> c = Checks()
    >>> c.add("rows_counted", 6000 == 6000, value=6000, expect="== n = 6000")
    >>> c.add("throughput", finite_positive(float("nan")), value=float("nan"), expect="> 0")
    >>> c.failed
    ['throughput']
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np


def finite_positive(*values: float | None) -> bool:
    """True when every value is a finite number > 0."""
    return all(v is not None and math.isfinite(v) and v > 0 for v in values)


def digest(indices: np.ndarray) -> str:
    """sha256 hex of the indices as little-endian int64 (the wire format of the service)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


class Checks:
    """Named pass/fail checks, each with the measured value and the expectation."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def add(self, name: str, ok: bool, *, value: Any, expect: str) -> None:
        """Record check ``name``; a name added twice keeps the worse result."""
        prev = self.results.get(name)
        if prev is not None and not prev["ok"]:
            return
        self.results[name] = {"ok": bool(ok), "value": value, "expect": expect}

    @property
    def failed(self) -> list[str]:
        """Names of the failed checks, in the order they were added."""
        return [name for name, r in self.results.items() if not r["ok"]]

    def to_json(self) -> dict[str, Any]:
        """``{"ok": bool, "failed": [names], "checks": {name: {"ok", "value", "expect"}}}``."""
        return {"ok": not self.failed, "failed": self.failed, "checks": self.results}

    def summary(self) -> str:
        """One line per failed check, or a line saying all passed."""
        if not self.failed:
            return f"checks: all {len(self.results)} passed"
        lines = [f"checks: {len(self.failed)} of {len(self.results)} FAILED"]
        for name in self.failed:
            r = self.results[name]
            lines.append(f"  FAILED {name}: got {r['value']!r}, expected {r['expect']}")
        return "\n".join(lines)
