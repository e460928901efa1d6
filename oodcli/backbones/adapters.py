"""Any ``nn.Module`` as a ``Backbone``: its layers read by forward hooks (the torch side of
``oodcli.backbones.sources``).

``logits`` is the model's output, ``penultimate`` the input of its final ``nn.Linear`` (found by
walking the module, or ``--head``), ``featmap`` the input of its global pool, and ``--layer
NAME=PATH[:in|:out]`` any submodule's input or output (4-D maps averaged over H x W). One seeded
probe forward at build time fixes each layer's shape and checks that the head reproduces the
logits, so the head-based scorers get the right weights or none at all.
"""

from __future__ import annotations

import difflib
import sys
from typing import TYPE_CHECKING

import torch
from torch import nn

from oodcli.backbones.modules import Backbone, read_state_dict
from oodcli.errors import OodError, UsageError

if TYPE_CHECKING:  # the torch-free side; it imports this module, never the other way round
    from oodcli.backbones.sources import ModelSource

POOL_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


# ---- making the module -------------------------------------------------------------------------


def make_module(source: ModelSource, kind: str, value) -> nn.Module:
    """The bare network of ``source`` with its weights (``parse_weights``' kind and value), in eval mode."""
    torch.manual_seed(value if kind == "random" else 0)
    net = _MAKERS[source.source](source, kind, value)
    if not isinstance(net, nn.Module):
        raise OodError(f"{source.source}:{source.name} returned a {type(net).__name__}, not a torch nn.Module")
    return net.eval()


def _torchvision(source: ModelSource, kind: str, value) -> nn.Module:
    from torchvision import models

    if kind == "name":
        enum = models.get_model_weights(source.name)
        try:
            return models.get_model(source.name, weights=enum[value])
        except (OSError, RuntimeError) as exc:  # typically no internet on first use
            raise OodError(f"cannot download torchvision:{source.name} weights {value} ({type(exc).__name__}); "
                           "connect to the internet once or pass --weights FILE") from None
    if kind == "random":
        return models.get_model(source.name, weights=None)
    return _with_file(source, value, lambda classes: models.get_model(source.name, weights=None,
                                                                        **({"num_classes": classes} if classes else {})))


def _timm(source: ModelSource, kind: str, value) -> nn.Module:
    import timm

    if kind == "name":
        try:
            return timm.create_model(source.name, pretrained=True)
        except Exception as exc:  # no internet, no such tag on the hub
            raise OodError(f"cannot load timm:{source.name} pretrained weights ({type(exc).__name__}); connect to "
                           "the internet once or pass --weights FILE (or random)") from None
    if kind == "random":
        return timm.create_model(source.name, pretrained=False)
    return _with_file(source, value, lambda classes: timm.create_model(
        source.name, pretrained=False, **({"num_classes": classes} if classes else {})))


def _hf(source: ModelSource, kind: str, value) -> nn.Module:
    import transformers

    auto = transformers.AutoModelForImageClassification if source.details["classifies"] else transformers.AutoModel
    repo, revision = source.details["repo"], source.details["revision"]
    try:
        if kind == "default":
            return auto.from_pretrained(repo, revision=revision)
        config = transformers.AutoConfig.from_pretrained(repo, revision=revision)
    except Exception as exc:
        raise OodError(f"cannot load hf:{source.name} ({type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:200]})") from None
    net = auto.from_config(config)
    if kind == "file":
        load_weights(net, read_state_dict(value), str(value), source.strict)
    return net


def _python(source: ModelSource, kind: str, value) -> nn.Module:
    import importlib
    import importlib.util

    target, factory = source.details["target"], source.details["factory"]
    label = f"python:{source.name}"
    try:
        if target.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"oodcli_user_model_{abs(hash(target))}", target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except Exception as exc:
        raise OodError(f"{label}: importing {target} failed: {_one_line(exc)}") from None
    make = getattr(module, factory, None)
    if not callable(make):
        near = difflib.get_close_matches(
            factory, [n for n in vars(module) if callable(getattr(module, n)) and not n.startswith("_")], n=5)
        raise UsageError(f"{label}: {target} has no callable '{factory}'"
                         + (f"; close matches: {', '.join(near)}" if near else ""))
    try:
        net = make()
    except Exception as exc:
        raise OodError(f"{label}: {factory}() raised {_one_line(exc)}") from None
    if kind == "file" and isinstance(net, nn.Module):
        load_weights(net, read_state_dict(value), str(value), source.strict)
    return net


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _with_file(source: ModelSource, path, make) -> nn.Module:
    """A library architecture from a state_dict file: its class count read from the file's head."""
    state = read_state_dict(path)
    net = make(None)
    found = final_linear(net)
    if found is not None:
        key = f"{found[0]}.weight"
        if key in state and state[key].ndim == 2 and state[key].shape[0] != found[1].out_features:
            net = make(int(state[key].shape[0]))
    load_weights(net, state, str(path), source.strict)
    return net


def load_weights(net: nn.Module, state: dict, source: str, strict: bool = True) -> None:
    """Load a state_dict, counting what does not fit (the first few keys named); refused unless
    ``strict`` is False, in which case the keys that fit are loaded and the rest told on stderr."""
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)):
        if keys:
            more = f", +{len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{more})")
    if problems and strict:
        raise OodError(f"weights {source} do not fit the model: {'; '.join(problems)}; "
                       "pass --strict false to load only the keys that fit")
    if problems:
        print(f"warning: weights {source}: {'; '.join(problems)}; loaded the {len(own) - len(missing) - len(wrong)} "
              "keys that fit", file=sys.stderr)
    net.load_state_dict({k: v for k, v in state.items() if k in own and k not in wrong}, strict=False)


# ---- finding layers ----------------------------------------------------------------------------


def final_linear(net: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` in the module's registration order (where classifiers sit)."""
    found = None
    for path, module in net.named_modules():
        if isinstance(module, nn.Linear):
            found = (path, module)
    return found


def global_pool(net: nn.Module) -> tuple[str, nn.Module] | None:
    """The last adaptive pooling module: the global pool in front of a CNN's classifier."""
    found = None
    for path, module in net.named_modules():
        if isinstance(module, POOL_TYPES) or "AdaptivePool" in type(module).__name__:
            found = (path, module)
    return found


def module_at(net: nn.Module, path: str, label: str, option: str) -> nn.Module:
    """The submodule at ``path``; a path that does not exist is refused naming the paths near it."""
    names = dict(net.named_modules())
    if path in names and path:
        return names[path]
    parts = path.split(".")
    known = ""
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in names:
            known = ".".join(parts[:i])
            break
    parent = names[known]
    children = [f"{known}.{n}" if known else n for n, _ in parent.named_children()]
    near = list(dict.fromkeys(children + difflib.get_close_matches(path, [n for n in names if n], n=4, cutoff=0.5)))
    raise UsageError(f"{option} '{path}': {label} has no module '{path}'; near it: "
                     f"{', '.join(near[:10]) or '(no submodules)'}")


def _tensor(value):
    """The tensor in a module's input or output (a tuple's first, a ModelOutput's first)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    return None


# ---- the Backbone --------------------------------------------------------------------------------


class HookedBackbone(Backbone):
    """A ``Backbone`` over any module; see the module docstring."""

    def __init__(self, source: ModelSource, net: nn.Module, input_size: int):
        super().__init__()
        self.net, self.kind, self.label = net, source.source, f"{source.source}:{source.name}"
        self.has_logits = source.has_logits
        self.missing: dict[str, str] = {}
        self._captured: dict[str, torch.Tensor] = {}
        self._pooled: set[str] = set()
        self._head: nn.Linear | None = None
        taps: dict[str, tuple[nn.Module, str]] = {}
        if source.has_logits:
            if source.head:
                head = module_at(net, source.head, self.label, "--head")
                taps["penultimate"] = (head, "in")
                self._head = head if isinstance(head, nn.Linear) else None
            elif (found := self._classifier()) is not None:
                taps["penultimate"] = (found, "in")
                self._head = found
            else:
                self.missing["penultimate"] = "it has no nn.Linear classifier; name its head with --head MODULE.PATH"
        pool = global_pool(net) if self.kind != "timm" else None
        if pool is not None:
            taps["featmap"] = (pool[1], "in")
        for tap in source.taps:
            taps[tap.name] = (module_at(net, tap.path, self.label, "--layer"), tap.side)
        self._explicit_head = bool(source.head)
        self._custom = [tap.name for tap in source.taps]
        self._hooks = [self._hook(name, module, side) for name, (module, side) in taps.items()]
        self.eval()
        self.layer_shapes = self._probe(input_size)

    def _classifier(self) -> nn.Module | None:
        if self.kind == "timm":
            head = self.net.get_classifier()
            return head if isinstance(head, nn.Linear) else None
        found = final_linear(self.net)
        return found[1] if found else None

    def _hook(self, name: str, module: nn.Module, side: str):
        def keep(value):
            tensor = _tensor(value)
            if tensor is not None:
                self._captured[name] = tensor

        if side == "in":
            return module.register_forward_pre_hook(lambda m, args: keep(args))
        return module.register_forward_hook(lambda m, args, output: keep(output))

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's own forward: its output, and what the library names itself."""
        net = self.net
        if self.kind == "timm":
            features = net.forward_features(x)
            out = {"logits": net.forward_head(features)}
            if features.ndim == 4:
                out["featmap"] = features
            return out
        if self.kind == "hf":
            result = net(pixel_values=x)
            if self.has_logits:
                return {"logits": result.logits}
            pooled = getattr(result, "pooler_output", None)
            pooled = pooled if pooled is not None else result.last_hidden_state[:, 0]
            return {"penultimate": pooled.flatten(1)}
        return {"logits": _tensor(net(x))}

    def _layers(self, x: torch.Tensor, wanted) -> dict[str, torch.Tensor]:
        self._captured = {}
        try:
            out = self._run(x)
            for name in wanted:
                if name in out:
                    continue
                value = self._captured.get(name)
                if value is None:
                    continue
                if name == "penultimate":
                    value = value.flatten(1)
                elif name != "featmap" and value.ndim == 4:
                    value = value.mean(dim=(2, 3))
                out[name] = value
        finally:
            self._captured = {}
        return out

    def _probe(self, size: int) -> dict[str, tuple[int, ...]]:
        """Shapes of every layer on one seeded input; drops what is not there, saying why."""
        param = next(iter(self.net.parameters()), None)
        device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, size, size, generator=generator).to(device=device, dtype=dtype)
        names = ["logits", "penultimate", "featmap", *self._custom]
        try:
            with torch.no_grad():
                out = self._layers(x, names)
        except Exception as exc:
            raise OodError(f"{self.label} does not run on a {size}x{size} image: {_one_line(exc)}; "
                           "check --preprocess crop") from None
        if "logits" in out and out["logits"].ndim != 2:
            raise OodError(f"{self.label} returns {tuple(out['logits'].shape)} per batch, not [N, classes]")
        if "featmap" in out and out["featmap"].ndim != 4:
            del out["featmap"]
        if "featmap" not in out:
            self.missing["featmap"] = "it has no global pool over a 4-D activation map (e.g. a ViT)"
        for name in self._custom:
            if name not in out:
                self.missing[name] = "the module it names did not run in the model's forward pass"
        if self._head is not None and "penultimate" in out and "logits" in out:
            pen, logits = out["penultimate"], out["logits"]
            fits = pen.shape[-1] == self._head.in_features and torch.allclose(
                self._head(pen), logits, rtol=1e-4, atol=1e-4)
            if not fits:
                if self._explicit_head:
                    self._head = None  # its input is still the penultimate asked for, but no head
                else:
                    del out["penultimate"]
                    self._head = None
                    self.missing["penultimate"] = ("its last nn.Linear does not compute the output; name the head "
                                                   "with --head MODULE.PATH")
        return {name: tuple(value.shape[1:]) for name, value in out.items()}

    def forward_layers(self, x, layers):
        layers = self.check_layers(layers)
        out = self._layers(x, layers)
        return {name: out[name].float() for name in layers}

    def head(self):
        if self._head is None:
            return None
        weight = self._head.weight.detach()
        bias = self._head.bias.detach() if self._head.bias is not None else torch.zeros(weight.shape[0])
        return weight, bias


# ---- re-entering the network after an early module (GROOD's mixup) -------------------------------

#: the first stage of the architectures torchvision, timm and transformers name this way, in the order
#: tried: ResNets, ConvNeXt/RegNet (timm), Swin (timm), ViT/DeiT/EfficientNet (timm), torchvision's ViT,
#: RegNet and its features-sequence models (ConvNeXt, EfficientNet, MobileNet, Swin), Hugging Face's
EARLY_PATHS = ("layer1", "stages.0", "layers.0", "blocks.0", "encoder.layers.encoder_layer_0",
               "trunk_output.block1", "features.1", "resnet.encoder.stages.0", "convnext.encoder.stages.0",
               "vit.encoder.layer.0")


class ReEntry:
    """One forward pass of a ``HookedBackbone`` with a forward hook on its early module: ``run(x)`` gives
    (early output, logits, penultimate), and ``run(x, edit)`` replaces the early output by ``edit(it)``
    before the rest of the network sees it (GROOD's eq. 9: the rest runs on the mixed map). Valid only
    where that output is the only path from the image to the head, which ``check`` tests."""

    def __init__(self, net: HookedBackbone, path: str):
        self.net, self.path = net, path
        self.module = module_at(net.net, path, net.label, "--early")
        self.classes = int(net._head.out_features)

    def run(self, x: torch.Tensor, edit=None):
        seen: list[torch.Tensor] = []

        def hook(module, args, output):
            first = output[0] if isinstance(output, tuple) and output else output
            if not isinstance(first, torch.Tensor):
                raise OodError(f"--early {self.path}: the module returns a {type(output).__name__}, not a tensor")
            seen.append(first.clone())  # a later in-place op must not change what was seen
            if edit is None:
                return None
            new = edit(first)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = self.module.register_forward_hook(hook)
        try:
            out = self.net._layers(x, ("logits", "penultimate"))
        finally:
            handle.remove()
        if len(seen) != 1:
            raise OodError(f"--early {self.path}: the module ran {len(seen)} times in one forward pass of "
                           f"{self.net.label}; GROOD re-enters after a module that runs once")
        return seen[0], out["logits"], out["penultimate"].flatten(1)

    def check(self, size: int) -> None:
        """The network on image b equals the network on image a with a's early output replaced by b's:
        otherwise something passes around the early module and re-entering there would be wrong."""
        param = next(iter(self.net.net.parameters()))
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(1, 3, size, size, generator=generator).to(param.device, param.dtype) for _ in range(2))
        with torch.no_grad():
            early_b, logits_b, _ = self.run(b)
            _, logits_ab, _ = self.run(a, lambda e: early_b)
        if not torch.allclose(logits_ab, logits_b, rtol=1e-4, atol=1e-4):
            raise OodError(f"--early {self.path}: the output of that module is not the only path from the image "
                           f"to the head of {self.net.label} (a connection passes around it); name a module whose "
                           "output feeds all the rest with --early MODULE.PATH")


def reentry(net: HookedBackbone, path: str | None, size: int) -> ReEntry:
    """Where GROOD re-enters ``net``: ``path`` (``--early``), else the first stage its architecture
    names (``EARLY_PATHS``); refused in one line where the model offers neither or has no head."""
    if net._head is None or not net.has_logits:
        raise OodError(f"{net.label} has no classifier head computing its logits, which GROOD's mixup needs "
                       "(the head classifies the mixed maps); use --ood-prototype noise, val or mean")
    if path is None:
        names = dict(net.net.named_modules())
        path = next((p for p in EARLY_PATHS if p in names), None)
        if path is None:
            kind = "an nn.Sequential: give the index of the module, e.g. --early 2" if isinstance(net.net, nn.Sequential) \
                else "e.g. --early layer1"
            raise UsageError(f"{net.label} names no first stage GROOD knows; name the module whose output is its "
                             f"early map with --early MODULE.PATH ({kind})")
    split = ReEntry(net, path)
    split.check(size)
    return split


def _open_clip(source: ModelSource, kind: str, value) -> nn.Module:
    from oodcli.backbones import open_clip_source

    return open_clip_source.make_module(source, kind, value)


_MAKERS = {"torchvision": _torchvision, "timm": _timm, "hf": _hf, "python": _python, "open_clip": _open_clip}
