"""Small image sets held as tensors, for the demo trainers (digits CNN, tiny CLIP)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from oodcli.data.base import open_source


def split_tensors(benchmark, split: str, transform, root) -> tuple[torch.Tensor, torch.Tensor]:
    """A benchmark split preprocessed once into (images [N, 3, H, W], labels [N]); for small sets only."""
    data = open_source(benchmark.split(split).source, root)
    images = torch.stack([transform(data.load(i)) for i in range(len(data))])
    return images, torch.as_tensor(np.asarray(data.labels), dtype=torch.long)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (replicate padding), one per batch."""
    pad = F.pad(x, [max_shift] * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
