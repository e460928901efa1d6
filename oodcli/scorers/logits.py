"""Scores computed from the classifier's logits alone: MSP, MaxLogit, Energy, GEN, entropy,
temperature scaling, KL matching, weighted energy and GradNorm's KL term. Everything is computed
in float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.scorers.mahalanobis import class_sums
from oodcli.store import features_node


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(x))) along ``axis``, stable (scipy.special's would cost 0.3 s of import per command)."""
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.log(np.sum(np.exp(x - top), axis=axis)) + np.squeeze(top, axis=axis)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x - np.expand_dims(logsumexp(x, axis=axis), axis)


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy T * logsumexp(logits / T); shared by every energy-based scorer."""
    return temperature * logsumexp(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def kl_gradient_l1(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """||d KL(u || softmax(z / T)) / d z||_1 = ||softmax(z / T) - u||_1 / T for u uniform over the
    C classes: GradNorm's output-space factor U, also the L1 norm of the head bias's gradient."""
    z = np.asarray(logits, dtype=np.float64)
    return np.abs(softmax(z / temperature, axis=1) - 1.0 / z.shape[1]).sum(axis=1) / temperature


@register
class MSP(Scorer):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017)."""

    name = "msp"

    def __init__(self):
        pass

    def score_batch(self, batch):
        return softmax(np.asarray(batch["logits"], dtype=np.float64), axis=1).max(axis=1)


@register
class MaxLogit(Scorer):
    """Largest unnormalised logit (Hendrycks et al., 2022)."""

    name = "maxlogit"

    def __init__(self):
        pass

    def score_batch(self, batch):
        return batch["logits"].max(axis=1)


@register
class Energy(Scorer):
    """Negative free energy T * logsumexp(logits / T) (Liu et al., 2020); T = 1 as published."""

    name = "energy"

    def __init__(self, temperature: float = 1.0):
        self.temperature = float(temperature)

    def score_batch(self, batch):
        return energy(batch["logits"], self.temperature)


@register
class GEN(Scorer):
    """Generalized entropy -sum_j p_j^g (1 - p_j)^g over the top-M softmax probabilities (Liu et al., 2023).

    Defaults gamma = 0.1 and M = 100 as published; with fewer than M classes all are used.
    """

    name = "gen"

    def __init__(self, gamma: float = 0.1, top_m: int = 100):
        self.gamma = float(gamma)
        self.top_m = int(top_m)
        if self.gamma <= 0 or self.top_m < 1:
            raise ValueError("gamma must be > 0 and top_m >= 1")

    def score_batch(self, batch):
        p = softmax(np.asarray(batch["logits"], dtype=np.float64), axis=1)
        m = min(self.top_m, p.shape[1])
        top = np.partition(p, p.shape[1] - m, axis=1)[:, p.shape[1] - m :]  # the m largest, any order
        return -np.sum(top**self.gamma * (1.0 - top) ** self.gamma, axis=1)


@register
class Entropy(Scorer):
    """Negative predictive entropy sum_c p_c log p_c of the softmax (the entropy baseline of OpenOOD / pytorch-ood)."""

    name = "entropy"

    def __init__(self):
        pass

    def score_batch(self, batch):
        log_p = log_softmax(np.asarray(batch["logits"], dtype=np.float64), axis=1)
        return np.sum(np.exp(log_p) * log_p, axis=1)


# bounds on a fitted temperature: a train split the network fits perfectly drives the NLL optimum to T -> 0
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def nll_slope(blocks, beta: float) -> tuple[float, float]:
    """First and second derivative in beta = 1/T of the summed NLL  sum_i lse(beta z_i) - beta z_iy,
    over streamed (logits, labels) blocks: sum E_p[z] - z_y and sum Var_p[z] (>= 0: convex in beta)."""
    grad = hess = 0.0
    for z, y in blocks:
        z = z.astype(np.float64)
        p = softmax(beta * z, axis=1)
        mean = np.sum(p * z, axis=1)
        grad += float(np.sum(mean - z[np.arange(len(z)), y]))
        hess += float(np.sum(np.sum(p * z * z, axis=1) - mean**2))
    return grad, hess


def fit_temperature(blocks, start: float = 1.5, tol: float = 1e-9, max_passes: int = 100) -> tuple[float, int]:
    """The temperature minimising the NLL of streamed (logits, labels) blocks (``blocks()`` makes
    one pass), within [MIN_TEMPERATURE, MAX_TEMPERATURE]; returns (T, passes over the data).

    The NLL is convex in beta = 1/T. The second pass checks the bound the slope points to (a
    train split the network separates perfectly has its optimum there, and the slope only
    decays exponentially on the way); then Newton steps inside a bracket [lo, hi] that keeps
    the sign of the slope, with a geometric bisection whenever a step leaves the bracket or
    does not halve the previous one."""
    lo, hi = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    beta = 1.0 / start
    grad, hess = nll_slope(blocks(), beta)
    bound = hi if grad < 0 else lo
    bound_grad, _ = nll_slope(blocks(), bound)
    if grad == 0 or (bound_grad <= 0 if grad < 0 else bound_grad >= 0):  # optimum here or beyond the bound
        return 1.0 / (beta if grad == 0 else bound), 2
    lo, hi = (beta, hi) if grad < 0 else (lo, beta)
    last_step = hi - lo
    for passes in range(3, max_passes + 1):
        newton = beta - grad / hess if hess > 0 else np.nan
        if lo < newton < hi and abs(newton - beta) <= 0.5 * last_step:
            last_step, beta = abs(newton - beta), newton
        else:
            last_step, beta = hi - lo, float(np.sqrt(lo * hi))
        if last_step <= tol * beta:
            return 1.0 / beta, passes - 1
        grad, hess = nll_slope(blocks(), beta)
        if grad == 0:
            return 1.0 / beta, passes
        if grad > 0:
            hi = beta
        else:
            lo = beta
    return 1.0 / beta, max_passes


@register
class TempScaling(Scorer):
    """MSP of logits / T, T fitted by NLL on the ID train split (Guo et al., 2017), or given.

    Guo et al. and OpenOOD fit T by NLL on a held-out ID validation split. Here T is fitted
    (exactly, by safeguarded Newton over streamed passes) on the split ``score --train``
    names: ``train`` by default, the one labelled ID split every store has; ``--train val``
    fits on a validation split as OpenOOD does. On its own train split a network that fits its
    data well gets T < 1, and one that classifies every train sample right has no optimum (the
    NLL keeps falling as T -> 0, and MSP of logits / T saturates at 1): an optimum below 0.01
    is refused with what to do instead (the digits CNN is such a network). Logits that do not
    predict the labels push T up; it stops at 100 (near-uniform, still a ranking).
    ``temperature=X`` skips the fit and uses X.
    """

    name = "temp-scaling"
    needs_fit = True

    def __init__(self, temperature: float | None = None):
        self.temperature = None if temperature is None else float(temperature)
        if self.temperature is not None:
            if not self.temperature > 0:
                raise UsageError(f"temp-scaling.temperature must be positive, not {self.temperature}")
            self.needs_fit = False  # nothing to learn: no train split needed

    def prepare(self, store, backbone, train_split, model_id):
        status = super().prepare(store, backbone, train_split, model_id)
        if self.temperature is not None:
            self.state = {"temperature_used": self.temperature}
        return status

    def fit(self, store, backbone, split):
        def blocks():
            for b in self.blocks(store, backbone, split, "fit: NLL pass", labels=True):
                yield b["logits"], b["labels"]

        width = store.shape(f"{features_node(split, backbone)}/logits")[1]
        for _, labels in store.iter_rows(f"splits/{split}/labels"):
            if labels.size and labels.max() >= width:
                raise OodError(f"train split '{split}' has label {int(labels.max())} but the logits have {width} "
                               "classes; fit on the classifier's own training labels")
        temperature, passes = fit_temperature(blocks)
        if temperature == MIN_TEMPERATURE:
            raise OodError(f"temp-scaling: the network classifies (nearly) every sample of '{split}' right, so the "
                           f"NLL keeps falling as T -> 0 (below {MIN_TEMPERATURE}); fit on held-out ID data "
                           "(--train SPLIT) or give -p temp-scaling.temperature=T")
        return {"temperature_used": temperature, "passes": passes}

    def score_batch(self, batch):
        z = np.asarray(batch["logits"], dtype=np.float64) / self.state["temperature_used"]
        return softmax(z, axis=1).max(axis=1)


@register
class KLMatching(Scorer):
    """-min_c KL(p(x) || d_c), d_c the mean posterior of train samples predicted as c (Hendrycks et al., 2022).

    The paper takes d_c over a validation split; here it is the split ``score --train`` names.
    Classes the network never predicts on that split have no d_c and are left out of the min;
    a d_c entry that underflows to 0 is raised to 1e-300 so the KL stays finite.
    """

    name = "klm"
    needs_fit = True

    def __init__(self):
        pass

    def fit(self, store, backbone, split):
        def posteriors():
            for block in self.blocks(store, backbone, split, "fit pass 1/1"):
                p = softmax(block["logits"].astype(np.float64), axis=1)
                yield p, p.argmax(axis=1)

        classes = store.shape(f"{features_node(split, backbone)}/logits")[1]
        sums, counts = class_sums(posteriors(), classes)
        seen = np.flatnonzero(counts)
        return {"classes": seen, "log_templates": np.log(np.maximum(sums[seen] / counts[seen, None], 1e-300))}

    def score_batch(self, batch):
        log_p = log_softmax(np.asarray(batch["logits"], dtype=np.float64), axis=1)
        p = np.exp(log_p)
        kl = np.sum(p * log_p, axis=1)[:, None] - p @ self.state["log_templates"].T  # [N, classes seen]
        return -kl.min(axis=1)


def read_class_weights(spec: str) -> np.ndarray:
    """Per-class energy weights from a safetensors file (one tensor, or VOS's
    ``weight_energy.weight``) or a comma-separated list of numbers."""
    path = Path(spec)
    if path.suffix == ".safetensors" or path.exists():
        if not path.is_file():
            raise UsageError(f"weighted-energy.weights: no file {spec}")
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # not a safetensors file
            raise UsageError(f"weighted-energy.weights: cannot read {spec} as safetensors ({exc})") from None
        key = "weight_energy.weight" if "weight_energy.weight" in tensors else None
        if key is None and len(tensors) != 1:
            raise UsageError(f"weighted-energy.weights: {spec} holds {len(tensors)} tensors "
                             f"({', '.join(sorted(tensors))}); give a file with one, or with 'weight_energy.weight'")
        values = tensors[key or next(iter(tensors))]
    else:
        try:
            values = np.array([float(v) for v in spec.split(",")])
        except ValueError:
            raise UsageError(f"weighted-energy.weights={spec!r} is neither a file nor comma-separated numbers") from None
    values = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(values).all() or not (values > 0).any():
        raise UsageError("weighted-energy.weights must be finite with at least one positive value")
    return values


@register
class WeightedEnergy(Scorer):
    """Weighted energy log sum_c relu(w_c) exp(z_c), VOS's learned class weights w (Du et al., 2022; WeightedEBO).

    ``weights`` is a safetensors file holding the C weights (VOS's ``weight_energy.weight``)
    or a comma-separated list; without it every w_c = 1 and the score is the plain energy.
    """

    name = "weighted-energy"

    def __init__(self, weights: str | None = None):
        self.weights = None if weights is None else str(weights)
        self.class_weights = None if weights is None else read_class_weights(self.weights)

    def score_batch(self, batch):
        z = np.asarray(batch["logits"], dtype=np.float64)
        if self.class_weights is None:
            return logsumexp(z, axis=1)
        if len(self.class_weights) != z.shape[1]:
            raise UsageError(f"weighted-energy.weights has {len(self.class_weights)} values but the logits have "
                             f"{z.shape[1]} classes")
        with np.errstate(divide="ignore"):
            log_w = np.log(np.maximum(self.class_weights, 0.0))  # relu; log 0 = -inf drops the class
        return logsumexp(z + log_w, axis=1)


@register
class GradNormKL(Scorer):
    """GradNorm's KL term U = ||softmax(z / T) - u||_1 / T, the head-only gradient norm (Huang et al., 2021).

    GradNorm scores ||d KL(u || softmax(z / T)) / dW||_1 for the head z = W h + b, which factors
    into U * V: U, the gradient's L1 norm at the head's output (equal to the L1 norm of the bias
    gradient, the head's only part not multiplied by h), and V = ||h||_1, the feature norm (paper
    Sec. 5 analyses the two factors). ``gradnorm`` is U * V and needs the penultimate features
    and the head; this is U alone, read from the logits of any store; ``l1norm`` is V alone.
    T = 1 as published.
    """

    name = "gradnorm-kl"

    def __init__(self, temperature: float = 1.0):
        self.temperature = float(temperature)
        if not self.temperature > 0:
            raise UsageError(f"gradnorm-kl.temperature must be positive, not {self.temperature}")

    def score_batch(self, batch):
        return kl_gradient_l1(batch["logits"], self.temperature)
