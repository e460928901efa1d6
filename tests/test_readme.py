"""The README's "From Python" block runs as written, so the documented library cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(section: str) -> str:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no python block under '## {section}'"
    return block.group(1)


def test_from_python_block_runs(tmp_path):
    code = python_block("From Python")
    assert "oodcli.Detector" in code and "oodcli.report_frame" in code  # the block is the one documented
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "of digits 6-9 flagged OOD" in proc.stdout and (tmp_path / "demo.zarr").is_dir()
