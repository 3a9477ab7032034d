"""Progress bars of a job's phases for the command line (`saelect jobs wait`, `saelect demo`)."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["PHASE_UNITS", "PhaseProgress"]

PHASE_UNITS: dict[str, str] = {
    "featurizing": "rows",
    "training_sae": "fit",
    "encoding": "rows",
    "scoring": "rows",
}
"""What a phase's ``progress {done, total}`` counts, shown on its bar."""


class PhaseProgress:
    """A tqdm bar per phase of a job, fed with polled statuses (``wait_ready``'s callback).

    Prints one line when the phase changes (with the reason while ``queued``), then a bar of the
    phase's ``progress {done, total}`` with its rate; bars go to ``file`` (stderr). Where ``file``
    is not a terminal (a log), each phase ends with one summary line instead of a bar.
    """

    def __init__(self, job_id: str, file: Any = None) -> None:
        from saelect.service.logs import is_terminal

        self.job_id = job_id
        self.file = file if file is not None else sys.stderr
        self.phases: list[str] = []
        """Phases seen, in order."""
        self._bar: Any = None
        self._reason: str | None = None
        self._tty = is_terminal(self.file)
        self._counted: tuple[int, int] | None = None
        """(done, total) of the current counted phase; None in the others."""
        self._since = 0.0

    def __call__(self, status: dict[str, Any]) -> None:
        from tqdm import tqdm

        phase = str(status["phase"])
        progress = status.get("progress") or {}
        done, total = int(progress.get("done", 0)), int(progress.get("total", 0))
        if not self.phases or phase != self.phases[-1]:
            self.close(finished=phase != "failed")
            self.phases.append(phase)
            print(f"job {self.job_id}: {phase}", file=self.file, flush=True)
            if phase in PHASE_UNITS:
                self._counted, self._since = (0, 0), time.monotonic()
                if self._tty:
                    self._bar = tqdm(
                        total=total or None,
                        desc=phase,
                        unit=PHASE_UNITS[phase],
                        file=self.file,
                        leave=True,
                        dynamic_ncols=True,
                    )
        reason = status.get("reason")
        if phase == "queued" and reason and reason != self._reason:
            print(f"  waits: {reason}", file=self.file, flush=True)
        self._reason = reason
        if self._counted is not None:
            self._counted = (done, total)
        if self._bar is not None:
            if total and self._bar.total != total:
                self._bar.total = total
            self._bar.update(max(0, done - self._bar.n))

    def close(self, finished: bool = False) -> None:
        """End the current phase: close its bar, or (no terminal) print its one summary line.

        ``finished``: the job went on to a later phase, so this one is complete, whatever its last
        polled progress said (a phase can end between two polls).
        """
        if finished and self._counted is not None and self._counted[1]:
            self._counted = (self._counted[1], self._counted[1])
            if self._bar is not None:
                self._bar.update(max(0, self._counted[1] - self._bar.n))
        if self._bar is not None:
            self._bar.close()
        elif self._counted is not None:
            phase, (done, total) = self.phases[-1], self._counted
            seconds = time.monotonic() - self._since
            unit = PHASE_UNITS[phase]
            rate = f", {done / seconds:.0f} {unit}/s" if seconds > 0 and done else ""
            print(
                f"{phase}: {done}/{total or '?'} {unit} in {seconds:.1f} s{rate}",
                file=self.file,
                flush=True,
            )
        self._bar, self._counted = None, None
