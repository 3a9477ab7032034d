"""benchmarks/doc_block.py: a benchmark's generated block replaced in place, the prose kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.doc_block import replace_block, replace_marked

BEGIN, END = "<!-- BEGIN GENERATED: x -->", "<!-- END GENERATED: x -->"


def test_block_is_replaced_between_its_markers_and_the_prose_kept(tmp_path: Path) -> None:
    doc = tmp_path / "scaling.md"
    doc.write_text(f"# Scaling\n\nintro\n\n{BEGIN}\nold | 1\n{END}\n\nafter\n")
    replace_block(doc, BEGIN, END, f"{BEGIN}\nnew | 2\n{END}\n", heading="Measured")
    assert doc.read_text() == f"# Scaling\n\nintro\n\n{BEGIN}\nnew | 2\n{END}\n\nafter\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_block_without_markers_is_appended_under_its_heading(tmp_path: Path) -> None:
    doc = tmp_path / "scaling.md"
    doc.write_text("# Scaling\n\nintro\n")
    replace_block(doc, BEGIN, END, f"{BEGIN}\nrow\n{END}", heading="Measured")
    assert doc.read_text() == f"# Scaling\n\nintro\n\n## Measured\n\n{BEGIN}\nrow\n{END}\n"
    replace_block(doc, BEGIN, END, f"{BEGIN}\nrow 2\n{END}", heading="Measured")
    assert doc.read_text().count("## Measured") == 1 and "row 2" in doc.read_text()


def test_block_must_carry_its_markers(tmp_path: Path) -> None:
    doc = tmp_path / "scaling.md"
    doc.write_text("# Scaling\n")
    with pytest.raises(ValueError, match="markers"):
        replace_block(doc, BEGIN, END, "row", heading="Measured")
    assert doc.read_text() == "# Scaling\n"


def test_marked_block_is_replaced_and_a_doc_without_markers_refused(tmp_path: Path) -> None:
    doc = tmp_path / "train.md"
    doc.write_text("# T\n\n<!-- r:begin -->\nold\n<!-- r:end -->\nprose\n")
    replace_marked(doc, "<!-- r:begin -->", "<!-- r:end -->", "new\n")
    assert doc.read_text() == "# T\n\n<!-- r:begin -->\nnew\n<!-- r:end -->\nprose\n"
    bare = tmp_path / "bare.md"
    bare.write_text("# T\n")
    with pytest.raises(ValueError, match="no <!-- r:begin -->"):
        replace_marked(bare, "<!-- r:begin -->", "<!-- r:end -->", "new\n")
    assert bare.read_text() == "# T\n"
