"""The networks themselves: the ``Backbone`` module every family builds, and checkpoint loading.

This is the torch side of ``oodcli.backbones``; specs and the registry
(``oodcli.backbones.spec``) never import it, so only code that runs a network does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from oodcli.errors import OodError, UsageError


class Backbone(nn.Module):
    """A network that maps a batch of images to ``{layer: tensor}``.

    Subclasses implement ``forward_layers`` and, when they end in a linear
    classifier, ``head`` (ReAct, ASH and ViM need its weights).
    """

    #: layer name -> per-sample shape, filled in by the subclass after building
    layer_shapes: dict[str, tuple[int, ...]]

    def forward_layers(self, x: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_layers(self, layers) -> tuple[str, ...]:
        """Fail early, naming the valid layers, before any compute is spent."""
        layers = tuple(layers)
        unknown = [name for name in layers if name not in self.layer_shapes]
        if unknown:
            raise UsageError(
                f"unknown layer '{unknown[0]}' for this model; choose from: {', '.join(self.layer_shapes)}"
            )
        return layers

    def forward(self, x: torch.Tensor, layers: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        return self.forward_layers(x, tuple(layers or self.layer_shapes))

    def head(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight [C, D], bias [C]) of the final linear classifier, or None."""
        return None

    def extras(self) -> dict:
        """Other arrays scorers need beside the layers, as {relative name: numpy array}; extract
        keeps them under backbones/<name>/ (APEX/PALM models: their prototypes and qualities)."""
        return {}


class StagedClassifier(Backbone):
    """A CNN classifier cut into early -> mid -> head, the shared shape of our CNN families.

    ``early`` runs up to and including the first residual/conv block, ``mid`` maps that
    feature map to the pooled penultimate vector and ``head`` is the linear classifier, so
    feature-space methods (GROOD mixup) can re-enter the network after ``early``.

    ``pool_at`` is the index in ``mid`` where global pooling starts: ``mid[:pool_at]`` gives
    the last stage's activation map, the ``featmap`` layer [C, H, W] that ASH and SCALE shape
    before pooling. Its H x W depends on the input, so ``input_size`` (the preprocessing's
    crop) fixes the declared shape with one probe forward at build time. No module is added,
    so state_dict keys stay those of early/mid/fc.
    """

    def __init__(self, early: nn.Module, mid: nn.Module, fc: nn.Linear, pool_at: int | None = None,
                 input_size: int | None = None):
        super().__init__()
        self.early, self.mid, self.fc = early, mid, fc
        self.pool_at = pool_at
        early_channels = [m for m in early.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.layer_shapes = {
            "logits": (fc.out_features,),
            "penultimate": (fc.in_features,),
            "early": (early_channels,),
        }
        self.eval()
        if pool_at is not None and input_size is not None:
            param = next(self.parameters())
            with torch.no_grad():
                probe = torch.zeros(1, 3, input_size, input_size, dtype=param.dtype, device=param.device)
                self.layer_shapes["featmap"] = tuple(self.mid[:pool_at](self.early(probe)).shape[1:])

    def stages(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.early, self.mid, self.fc

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc.weight.detach(), self.fc.bias.detach()

    def forward_layers(self, x, layers):
        layers = self.check_layers(layers)
        fmap = self.early(x)
        out = {}
        if "early" in layers:
            out["early"] = fmap.mean(dim=(2, 3))
        if {"penultimate", "logits", "featmap"} & set(layers):
            if "featmap" in layers:  # the same pass, split at the pooling
                out["featmap"] = self.mid[: self.pool_at](fmap)
                pen = self.mid[self.pool_at:](out["featmap"])
            else:
                pen = self.mid(fmap)
            if "penultimate" in layers:
                out["penultimate"] = pen
            if "logits" in layers:
                out["logits"] = self.fc(pen)
        return {name: out[name].float() for name in layers}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a user checkpoint safely (no pickle code execution) into a flat state_dict.

    Accepts .safetensors or a torch.save file; unwraps the usual {"state_dict": ...}
    wrappers and strips a DataParallel "module." prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise OodError(f"weights file not found: {path}; pass --weights PATH to an existing checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure is a bad file, not a bug here
        raise OodError(
            f"cannot read weights file {path} ({type(e).__name__}); "
            "expected a state_dict saved with torch.save or safetensors"
        ) from None
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OodError(f"weights file {path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that explains a mismatch in one line instead of a long RuntimeError."""
    own = module.state_dict()
    # old checkpoints lack BatchNorm's step counter; torch fills it in, so it is not "missing"
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label} keys: {', '.join(keys[:3])}{more}")
        raise OodError(f"checkpoint {source} does not fit this model; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
