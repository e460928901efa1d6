"""Shared fixtures: tiny models and the embedded digits data, all offline."""

from __future__ import annotations

import numpy as np
import pytest

from oodcli.data.base import ImageDataset


class ArrayImages(ImageDataset):
    """A small in-memory image data set for tests."""

    def __init__(self, name: str, n: int, seed: int = 0, size: int = 32, labels=None):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.name = name
        self._images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
        self.labels = np.asarray(labels if labels is not None else rng.integers(0, 6, n), dtype=np.int64)

    def load(self, i: int):
        return self._images[i]


@pytest.fixture
def images():
    return ArrayImages


def one_line_error(text: str) -> bool:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in text


@pytest.fixture
def ctrl_c():
    """Python's own Ctrl-C handler for the test, as in an interactive terminal. A shell that
    starts the suite in the background (or under nohup) leaves SIGINT ignored, and Python then
    installs no handler; tests of what Ctrl-C does must not depend on how they were started."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def run(capsys, *args):
    """The CLI in-process: (exit code, stdout, stderr)."""
    from oodcli.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and arrays: intra-op threads only add overhead (a lot of it on a shared CPU),
    and a process forked after torch ran two threads hangs in its first convolution."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
