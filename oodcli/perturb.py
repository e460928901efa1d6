"""Input perturbation at extraction time: ODIN (Liang et al., 2018) and Mahalanobis with
input preprocessing (Lee et al., 2018).

Both need the gradient of the network with respect to its input, so they cannot be
computed from stored features: ``oodcli extract --perturb KIND[:key=value,...]`` runs
them and stores the network's output on the perturbed input as one more layer of the
split, ``<layer>@<kind>``; the settings go into the layer's attributes and the split's
fingerprint. The scorers in ``oodcli.scorers.perturbed`` read those layers.

- ``odin``: x' = x - eps * sign(-grad_x log S_yhat(x; T)), S the softmax of f(x)/T and
  yhat its argmax; stores the logits f(x') as ``logits@odin``. Defaults T = 1000,
  eps = 0.0014 (OpenOOD's).
- ``mahalanobis``: x' = x - eps * sign(grad_x (f(x) - mu_c)' P (f(x) - mu_c)), c the
  closest class mean, with the class means and tied precision of the Mahalanobis scorer
  fitted on the ID train split already in the store; stores the penultimate features
  f(x') as ``penultimate@mahalanobis``. Default eps = 0.0014 (OpenOOD's mds_ensemble);
  the fit split itself (``train=``, default ``train``) is not perturbed.

Reading of eps: both papers' code steps by eps in [0, 1] pixel units, i.e. eps / std_c per
channel in the normalised input the network sees; so does this module (the preprocessing's
std). OpenOOD's ODIN does the same; OpenOOD's ``mds_ensemble`` instead divides by a fixed
0.5 for every data set, so its ImageNet step is about 2.2 times smaller than Lee et al.'s
(and this module's) at the same eps. sign(0) = 0: a pixel with no gradient does not move
(the reference code maps it to +1; with real-valued gradients this never matters).
Perturbation passes run in float32 (no autocast) so the sign of small gradients holds.

Parsing and fingerprints import no torch; only the ``*_step`` functions do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from oodcli.errors import OodError, UsageError

if TYPE_CHECKING:
    import torch

    from oodcli.store import Store

#: kind -> (layer it perturbs, its defaults)
KINDS: dict[str, tuple[str, dict]] = {
    "odin": ("logits", {"temperature": 1000.0, "epsilon": 0.0014}),
    "mahalanobis": ("penultimate", {"epsilon": 0.0014, "train": "train"}),
}
TEXT_KEYS = {"train"}  # every other key is a number


@dataclass(frozen=True)
class Perturbation:
    kind: str
    settings: tuple[tuple[str, object], ...]  # sorted (key, value) pairs, defaults filled in

    @property
    def params(self) -> dict:
        return dict(self.settings)

    @property
    def base(self) -> str:
        """The layer whose value on the perturbed input is stored."""
        return KINDS[self.kind][0]

    @property
    def layer(self) -> str:
        return f"{self.base}@{self.kind}"

    def describe(self) -> dict:
        return {"method": self.kind, **self.params}

    def applies_to(self, split: str) -> bool:
        """The Mahalanobis fit split is the reference, not a split to perturb."""
        return not (self.kind == "mahalanobis" and split == self.params["train"])


def parse_perturb(text: str) -> Perturbation:
    """``odin``, ``odin:temperature=1000,epsilon=0.0014``, ``mahalanobis:epsilon=0.002,train=train``."""
    kind, _, rest = text.strip().partition(":")
    example = "e.g. --perturb odin:temperature=1000,epsilon=0.0014 or --perturb mahalanobis:epsilon=0.0014"
    if kind not in KINDS:
        raise UsageError(f"--perturb '{text}': unknown kind '{kind}'; use one of {', '.join(KINDS)} ({example})")
    params = dict(KINDS[kind][1])
    for item in [part.strip() for part in rest.split(",")] if rest.strip() else []:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in params or not value:
            raise UsageError(f"--perturb '{text}': '{item}' is not KEY=VALUE with KEY one of "
                             f"{', '.join(params)} ({example})")
        if key in TEXT_KEYS:
            from oodcli.store import check_name

            params[key] = check_name(value, f"--perturb {kind} {key}")
            continue
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--perturb '{text}': {key}={value} is not a number") from None
        if not (number == number and abs(number) != float("inf")) or number < 0 or (key == "temperature" and number == 0):
            raise UsageError(f"--perturb '{text}': {key} must be a finite number "
                             f"{'> 0' if key == 'temperature' else '>= 0'}, not {value}")
        params[key] = number
    return Perturbation(kind, tuple(sorted(params.items())))


def parse_perturbations(texts: list[str] | None) -> tuple[Perturbation, ...]:
    found = [parse_perturb(t) for t in texts or []]
    kinds = [p.kind for p in found]
    twice = sorted({k for k in kinds if kinds.count(k) > 1})
    if twice:
        raise UsageError(f"--perturb {twice[0]} is given twice; a split holds one {twice[0]} variant")
    return tuple(found)


def check_perturbations(perturbs, spec, layers: tuple[str, ...], split_names: list[str]) -> None:
    """What can be refused before the store is touched: a backbone without the layer a
    perturbation stores, or a Mahalanobis fit split extracted here without penultimate."""
    for p in perturbs:
        if p.base not in spec.layers:
            raise UsageError(f"--perturb {p.kind} stores '{p.base}' of the perturbed input, and model "
                             f"'{spec.name}' has no '{p.base}' layer (it offers {', '.join(spec.layers)})")
        if p.kind == "mahalanobis" and p.params["train"] in split_names and "penultimate" not in layers:
            raise UsageError(f"--perturb mahalanobis fits on the penultimate features of split "
                             f"'{p.params['train']}'; add penultimate to --layers")


def check_reference(store: Store | None, path, perturbs, backbone: str, model_id: str, split_names: list[str]) -> None:
    """A Mahalanobis perturbation needs its fit split's features, made by the same model, in
    the store or among the splits of this call (which extracts it first). Refused before
    anything is written."""
    for p in perturbs:
        train = p.params.get("train")
        if p.kind != "mahalanobis" or train in split_names:
            continue
        _reference_attrs(store, path, backbone, train, model_id)


def _reference_attrs(store: Store | None, path, backbone: str, train: str, model_id: str) -> dict:
    from oodcli.store import features_node

    node = features_node(train, backbone)
    how = (f"extract it first (--split {train}, same --model/--weights), or name another ID split with "
           f"--perturb mahalanobis:train=SPLIT")
    if store is None or not store.exists(node):
        raise OodError(f"--perturb mahalanobis needs the ID train split '{train}' with '{backbone}' penultimate "
                       f"features in {path}; {how}")
    attrs = store.node_attrs(node)
    if not attrs.get("complete") or not store.is_array(f"{node}/penultimate"):
        raise OodError(f"--perturb mahalanobis needs complete '{backbone}' penultimate features on split "
                       f"'{train}' in {path}; {how}")
    if attrs.get("model_id") != model_id:
        raise OodError(f"split '{train}' in {path} holds '{backbone}' features of other weights or preprocessing "
                       f"than this extraction; re-extract it with the same --weights")
    return attrs


def reference_fingerprint(store: Store, backbone: str, train: str) -> str:
    from oodcli.scorers.base import train_fingerprint

    return train_fingerprint(store, backbone, train, ("penultimate",))


def fit_reference(store: Store, backbone: str, train: str, model_id: str) -> dict:
    """Class means and tied precision from the Mahalanobis scorer (its cached fit when it
    matches the train features, else a fresh streamed fit)."""
    from oodcli.scorers.mahalanobis import Mahalanobis
    from oodcli.scorers.base import check_train_split

    _reference_attrs(store, store.path, backbone, train, model_id)
    scorer = Mahalanobis()
    check_train_split(store, backbone, train, scorer.layers, scorer.min_train_classes)
    scorer.prepare(store, backbone, train, model_id)
    return {"means": scorer.state["means"], "precision": scorer.state["precision"]}


# ---- the perturbation steps (torch) ----------------------------------------------------------


def _step(x: torch.Tensor, loss_fn, epsilon: float, std: torch.Tensor) -> torch.Tensor:
    """x - eps * sign(grad_x loss) / std: one signed-gradient step that lowers ``loss``."""
    import torch

    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x), x)
    return (x - epsilon * torch.sign(grad) / std).detach()


def odin_step(net, x: torch.Tensor, temperature: float, epsilon: float, std: torch.Tensor) -> torch.Tensor:
    """Logits of the ODIN-perturbed input (not divided by T; the scorer does that)."""
    import torch

    def loss(inp):  # -log S_yhat(x; T), summed: each sample's gradient is its own
        logits = net(inp, ("logits",))["logits"] / temperature
        return torch.nn.functional.cross_entropy(logits, logits.argmax(1).detach(), reduction="sum")

    x_new = _step(x, loss, epsilon, std)
    with torch.no_grad():
        return net(x_new, ("logits",))["logits"].float()


def mahalanobis_step(net, x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor, epsilon: float,
                     std: torch.Tensor) -> torch.Tensor:
    """Penultimate features of the input moved to lower its Mahalanobis distance to the closest class."""
    import torch

    def loss(inp):
        f = net(inp, ("penultimate",))["penultimate"].double()
        fp = f @ precision  # expanded as in scorers.mahalanobis.Distances: no [N, C, D] tensor
        dist = (fp * f).sum(1, keepdim=True) - 2.0 * fp @ means.T + ((means @ precision) * means).sum(1)
        closest = dist.detach().argmin(1)
        return dist.gather(1, closest[:, None]).sum()

    x_new = _step(x, loss, epsilon, std)
    with torch.no_grad():
        return net(x_new, ("penultimate",))["penultimate"].float()


def make_steps(perturbs, net, preprocess_std, references: dict) -> dict:
    """layer -> function(x) giving that layer on the perturbed batch."""
    import torch

    param = next(net.parameters())
    std = torch.tensor(preprocess_std, dtype=torch.float32, device=param.device).view(1, -1, 1, 1)
    steps = {}
    for p in perturbs:
        s = p.params
        if p.kind == "odin":
            steps[p.layer] = lambda x, s=s: odin_step(net, x, s["temperature"], s["epsilon"], std)
        else:
            ref = references[p.layer]
            means = torch.as_tensor(ref["means"], dtype=torch.float64, device=param.device)
            precision = torch.as_tensor(ref["precision"], dtype=torch.float64, device=param.device)
            steps[p.layer] = lambda x, s=s, m=means, P=precision: mahalanobis_step(net, x, m, P, s["epsilon"], std)
    return steps
