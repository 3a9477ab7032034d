"""Replace a benchmark's generated block in a Markdown doc, atomically.

A benchmark writes its figures between two HTML comments, ``<!-- BEGIN GENERATED: ... -->`` and
``<!-- END GENERATED: ... -->``; the text around them is hand-written and kept as it is.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_block(path: Path, begin: str, end: str, block: str, *, heading: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in place of the block
    between those markers in ``path``; when the markers are absent, append it under ``## heading``
    (a missing file starts as ``# <stem title>``). Written to a temporary file, then renamed."""
    if not (block.startswith(begin) and block.rstrip("\n").endswith(end)):
        raise ValueError("the block must start and end with its markers")
    text = path.read_text() if path.exists() else f"# {path.stem.replace('_', ' ').title()}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + block.rstrip("\n") + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_marked(path: Path, begin: str, end: str, body: str) -> None:
    """Put ``body`` between the ``begin`` and ``end`` markers already in ``path`` (kept, with a
    newline after ``begin``). ValueError when the doc lacks them: such a doc is written by hand
    around its markers, and a block appended at its end would land in the wrong place."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} block")
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    path.write_text(pre + begin + "\n" + body + end + post)
