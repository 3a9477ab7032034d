"""A small progress helper: a tqdm bar (only on a terminal) plus an ``on_progress`` callback.

Long loops (feature extraction, SAE epochs, encoding) report through `Progress`, so a caller
can both show a bar and forward ``(done, total)`` to a job status.

Example:
    >>> seen = []
    >>> with Progress(10, progress=False, on_progress=lambda d, t: seen.append((d, t))) as bar:
    ...     bar.update(4)
    ...     bar.update(6)
    >>> seen
    [(0, 10), (4, 10), (10, 10)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

__all__ = ["OnProgress", "Progress", "batch_ranges"]

OnProgress = Callable[[int, int], None]
"""on_progress(done, total)."""


class Progress:
    """Counts work done out of ``total``; shows a tqdm bar and calls ``on_progress``.

    Parameters
    ----------
    total: units of work (rows, steps); >= 0.
    desc: the bar's label.
    progress: False never shows a bar; True shows one only when stderr is a terminal.
    on_progress: called with ``(done, total)`` at start and after each update.
    unit: the bar's unit label.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str = "",
        progress: bool = True,
        on_progress: OnProgress | None = None,
        unit: str = "it",
    ) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total = int(total)
        self.done = 0
        self.on_progress = on_progress
        self._bar: Any = None
        if progress:
            from tqdm.auto import tqdm

            # disable=None: tqdm shows the bar only when the output is a terminal
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, disable=None, leave=False)
        if on_progress is not None:
            on_progress(0, self.total)

    def update(self, n: int) -> None:
        """Add ``n`` units of work done."""
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(int(n))
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def set_postfix(self, **values: Any) -> None:
        """Show ``values`` next to the bar (e.g. the loss)."""
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def batch_ranges(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches covering ``[0, n)``.

    Raises ValueError when ``batch_size`` < 1 or ``n`` < 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)
