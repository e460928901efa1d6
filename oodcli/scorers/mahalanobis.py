"""Gaussian scores on features: Mahalanobis (Lee et al., 2018), Relative Mahalanobis, RMDS
(Ren et al., 2021), SSD's class-agnostic clusters (Sehwag et al., 2021) and Lee et al.'s
ensemble of Mahalanobis confidences over several layers.

Both fit class means and one covariance shared by all classes (the maximum-likelihood
estimate, divided by N) in two streamed passes over the train split: class sums, then
the scatter around the class means, accumulated in float64 chunk by chunk. RMDS's
class-agnostic covariance is that within-class scatter plus the between-class scatter
of the means. Precision matrices are pseudo-inverses, so a singular covariance
(N < D) still works. SSD and the ensemble are described at their classes.
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.store import features_node


def class_sums(blocks, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class feature sums and counts over streamed blocks (classes are label values)."""
    sums, counts = np.zeros((0, dim)), np.zeros(0, np.int64)
    for x, y in blocks:
        k = int(y.max()) + 1
        if k > len(counts):
            sums = np.vstack([sums, np.zeros((k - len(counts), dim))])
            counts = np.r_[counts, np.zeros(k - len(counts), np.int64)]
        order = np.argsort(y, kind="stable")
        ys = y[order]
        starts = np.r_[0, np.flatnonzero(np.diff(ys)) + 1]
        sums[ys[starts]] += np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
        counts += np.bincount(y, minlength=len(counts))
    return sums, counts


def fit_gaussians(scorer: Scorer, store, backbone: str, split: str, background: bool) -> dict:
    """Class means + shared precision (and, with ``background``, the class-agnostic Gaussian)."""
    layer = scorer.layers[0]

    def labelled(what):
        for b in scorer.blocks(store, backbone, split, what, labels=True):
            yield b[layer], b["labels"]

    dim = store.shape(f"splits/{split}/{backbone}/{layer}")[1]
    sums, counts = class_sums(labelled("fit pass 1/2"), dim)
    n = counts.sum()
    means_by_label = sums / np.maximum(counts, 1)[:, None]
    mean0 = sums.sum(0) / n
    scatter = np.zeros((dim, dim))
    for x, y in labelled("fit pass 2/2"):
        diff = x.astype(np.float64) - means_by_label[y]
        scatter += diff.T @ diff
    classes = np.flatnonzero(counts)
    means = means_by_label[classes]
    state = {"classes": classes, "means": means, "precision": np.linalg.pinv(scatter / n, hermitian=True)}
    if background:
        # total scatter = within-class scatter + between-class scatter (no third pass needed)
        between = (means - mean0).T @ ((means - mean0) * counts[classes][:, None])
        state |= {"mean0": mean0, "precision0": np.linalg.pinv((scatter + between) / n, hermitian=True)}
    return state


class Distances:
    """min_c (x - mu_c)^T P (x - mu_c) per row, expanded as x'Px - 2 x'P mu_c + mu_c'P mu_c
    so a block costs two matmuls; the class terms are computed once."""

    def __init__(self, means: np.ndarray, precision: np.ndarray):
        self.precision = precision
        self.means_p = means @ precision  # [C, D]
        self.const = np.sum(self.means_p * means, axis=1)  # [C]

    def sq(self, x: np.ndarray) -> np.ndarray:
        """Squared distance of every row to every class mean, [N, C]."""
        x = x.astype(np.float64)
        quad = np.sum((x @ self.precision) * x, axis=1)
        return quad[:, None] - 2.0 * x @ self.means_p.T + self.const

    def min_sq(self, x: np.ndarray) -> np.ndarray:
        return self.sq(x).min(axis=1)


@register
class Mahalanobis(Scorer):
    """Negative smallest squared Mahalanobis distance to a class mean, shared covariance (Lee et al., 2018)."""

    name = "mahalanobis"
    layers = ("penultimate",)
    needs_fit = True
    min_train_classes = 2

    def __init__(self):
        pass

    def fit(self, store, backbone, split):
        return fit_gaussians(self, store, backbone, split, background=False)

    def ready(self, store, backbone, split):
        self.classes = Distances(self.state["means"], self.state["precision"])

    def score_batch(self, batch):
        return -self.classes.min_sq(batch["penultimate"])


@register
class RMDS(Scorer):
    """Relative Mahalanobis: -min_c [MD_c(x) - MD_0(x)], MD_0 from one class-agnostic Gaussian (Ren et al., 2021)."""

    name = "rmds"
    layers = ("penultimate",)
    needs_fit = True
    min_train_classes = 2

    def __init__(self):
        pass

    def fit(self, store, backbone, split):
        return fit_gaussians(self, store, backbone, split, background=True)

    def ready(self, store, backbone, split):
        self.classes = Distances(self.state["means"], self.state["precision"])
        self.background = Distances(self.state["mean0"][None, :], self.state["precision0"])

    def score_batch(self, batch):
        x = batch["penultimate"]
        return -(self.classes.min_sq(x) - self.background.min_sq(x))


# ---- SSD: class-agnostic clusters of normalised features -----------------------------------

EPS = 1e-10  # the guard SSD's code adds to norms and standard deviations


def pooled(x: np.ndarray) -> np.ndarray:
    """A layer as one vector per row: a feature map [N, C, H, W] averaged over H x W (the
    network's own global pooling, and Lee et al.'s per-channel mean of each block)."""
    return x.mean(axis=(2, 3)) if x.ndim == 4 else x


def fit_clusters(blocks, dim: int) -> dict:
    """Means and per-cluster precisions (pinv of the covariance / N_c) over two streamed passes
    of ``(x, assignment)`` blocks; ``blocks(what)`` returns a fresh iterator."""
    sums, counts = class_sums(blocks("fit pass 2/3"), dim)
    keep = np.flatnonzero(counts)
    means_by_id = sums / np.maximum(counts, 1)[:, None]
    scatter = np.zeros((len(counts), dim, dim))
    for x, c in blocks("fit pass 3/3"):
        diff = x - means_by_id[c]
        for cluster in np.unique(c):
            rows = diff[c == cluster]
            scatter[cluster] += rows.T @ rows
    precisions = np.stack([np.linalg.pinv(scatter[c] / counts[c], hermitian=True) for c in keep])
    return {"means": means_by_id[keep], "precisions": precisions}


@register
class SSD(Scorer):
    """SSD: minus the smallest Mahalanobis distance to k-means clusters of normalised train features, k = 1 (Sehwag et al., 2021)."""

    name = "ssd"
    layers = ("penultimate",)
    needs_fit = True

    # The authors' evaluation (inspire-group/SSD, eval_ssd.py): L2-normalise, standardise each
    # dimension by the train mean and std (+1e-10), then the Mahalanobis distance to each cluster
    # with that cluster's own covariance (np.cov(bias=True), pinv); the score is minus the smallest.
    # ``clusters=1`` (their default and the paper's unlabeled setting) is one Gaussian of all the
    # train features; more clusters come from faiss k-means (100 iterations as theirs) on at most
    # 256 train rows per cluster (what faiss samples anyway), every row then assigned to its
    # nearest centroid. Streamed: mean/std, cluster sums, then the per-cluster scatter.

    def __init__(self, clusters: int = 1, seed: int = 0):
        self.clusters = int(clusters)
        if self.clusters < 1:
            raise ValueError("clusters must be >= 1")
        self.seed = int(seed)

    def standardised(self, x: np.ndarray, state: dict | None = None) -> np.ndarray:
        state = state or self.state
        unit = x.astype(np.float64) / (np.linalg.norm(x, axis=1, keepdims=True) + EPS)
        return (unit - state["mean"]) / (state["std"] + EPS)

    def fit(self, store, backbone, split):
        dim = store.shape(f"{features_node(split, backbone)}/penultimate")[1]
        total, total_sq, n = np.zeros(dim), np.zeros(dim), 0
        for block in self.blocks(store, backbone, split, "fit pass 1/3"):
            x = block["penultimate"].astype(np.float64)
            unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + EPS)
            total += unit.sum(0)
            total_sq += (unit**2).sum(0)
            n += len(unit)
        if n < self.clusters:
            raise UsageError(f"ssd.clusters={self.clusters} but train split '{split}' has only {n} rows")
        mean = total / n
        state = {"mean": mean, "std": np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))}
        centroids = self._kmeans(store, backbone, split, state, n) if self.clusters > 1 else None

        def assigned(what):
            for block in self.blocks(store, backbone, split, what):
                z = self.standardised(block["penultimate"], state)
                yield z, (np.zeros(len(z), np.int64) if centroids is None else nearest(z, centroids))

        return state | fit_clusters(assigned, dim)

    def _kmeans(self, store, backbone, split, state, n) -> np.ndarray:
        import faiss

        stride = max(1, -(-n // (256 * self.clusters)))  # every stride-th row: at most 256 per cluster
        sample, start = [], 0
        for block in self.blocks(store, backbone, split, "k-means sample"):
            x = block["penultimate"]
            sample.append(self.standardised(x[(-start) % stride :: stride], state))
            start += len(x)
        sample = np.concatenate(sample)
        kmeans = faiss.Kmeans(sample.shape[1], self.clusters, niter=100, seed=self.seed, verbose=False)
        kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
        return kmeans.centroids.astype(np.float64)

    def ready(self, store, backbone, split):
        self.gaussians = [Distances(m[None, :], p) for m, p in zip(self.state["means"], self.state["precisions"])]

    def score_batch(self, batch):
        z = self.standardised(batch["penultimate"])
        return -np.min([g.min_sq(z) for g in self.gaussians], axis=0)


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) of each row."""
    return (np.sum(centroids**2, axis=1) - 2.0 * x @ centroids.T).argmin(axis=1)


# ---- Mahalanobis on several layers, combined (Lee et al., 2018) -----------------------------

WEIGHTS = ("auto", "logistic", "equal")


def feature_layers(store, backbone: str, split: str) -> list[str]:
    """The feature layers a split holds for ``backbone``, in store order: vectors and maps, not
    the logits, perturbed layers (``@``) or token sets; ``featmap`` only without ``penultimate``
    (its H x W mean is the pooled vector a CNN's head reads, the same layer twice)."""
    node = features_node(split, backbone)
    names = [n for n in store.children(node) if store.is_array(f"{node}/{n}") and n != "logits" and "@" not in n
             and len(store.shape(f"{node}/{n}")) in (2, 4)]
    return [n for n in names if not (n == "featmap" and "penultimate" in names)]


@register
class MDSEnsemble(Scorer):
    """Mahalanobis confidence on every feature layer, weighted by logistic regression on val / ood/val, else equally (Lee et al., 2018)."""

    name = "mds-ensemble"
    layers = ("penultimate",)  # planned on it; the layers scored are settled per store in prepare
    needs_fit = True
    min_train_classes = 2

    # Per layer l (a feature map averaged over H x W, as the paper's per-block channel means):
    # class means and one shared covariance from the train split (the mahalanobis scorer's fit),
    # M_l(x) = -min_c (x_l - mu_c)' S_l^-1 (x_l - mu_c). The score is sum_l alpha_l M_l(x).
    # alpha: the paper fits a logistic regression detector on M_l of ID and OOD validation
    # samples; here that is ID ``val`` (label 1) against every ``ood/val/...`` split (label 0),
    # scikit-learn's LogisticRegressionCV with its defaults, as OpenOOD's mds_ensemble does. A
    # store without them gets alpha_l = 1 (weights=auto says which in the recorded hparams).
    # The input perturbation is an extraction option (extract --perturb mahalanobis), scored
    # as mahalanobis-perturbed; this ensemble reads the layers as extracted.

    def __init__(self, layers: str = "auto", weights: str = "auto"):
        self.layer_spec = str(layers)
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
        self.weights = weights
        self.used_weights = weights
        self.val_splits: list[str] = []

    def hparams(self) -> dict:
        return {"layers": ",".join(self.layers), "weights": self.used_weights}

    def prepare(self, store, backbone, train_split, model_id):
        self.layers = self._layers(store, backbone, train_split)
        self.val_splits = self._val_splits(store, backbone)
        self.used_weights = "logistic" if self.weights == "logistic" or (self.weights == "auto" and self.val_splits) \
            else "equal"
        if self.used_weights == "logistic" and not self.val_splits:
            raise OodError(f"mds-ensemble.weights=logistic needs the ID split 'val' and at least one ood/val/... split "
                           f"with the '{backbone}' layers {', '.join(self.layers)}; extract them, or use weights=equal")
        if self.val_splits:
            from oodcli.scoring import check_same_model

            check_same_model(store, backbone, [train_split, *self.val_splits])
        return super().prepare(store, backbone, train_split, model_id)

    def _layers(self, store, backbone, split) -> tuple[str, ...]:
        if self.layer_spec == "auto":
            found = feature_layers(store, backbone, split)
            if not found:
                raise OodError(f"train split '{split}' has no '{backbone}' feature layer for mds-ensemble")
            return tuple(found)
        names = tuple(dict.fromkeys(n.strip() for n in self.layer_spec.split(",") if n.strip()))
        if not names:
            raise UsageError("mds-ensemble.layers: name one or more layers, e.g. early,penultimate, or auto")
        node = features_node(split, backbone)
        for n in names:
            if store.is_array(f"{node}/{n}") and len(store.shape(f"{node}/{n}")) not in (2, 4):
                raise UsageError(f"mds-ensemble.layers: '{n}' is a set of tokens per row; name vector or map layers")
        return names

    def _val_splits(self, store, backbone) -> list[str]:
        """``val`` and the ood/val splits, when each holds every layer; [] otherwise."""
        from oodcli.scoring import ID_VAL_SPLIT, val_ood_splits

        ood = val_ood_splits(store)
        splits = [ID_VAL_SPLIT, *ood] if ood and ID_VAL_SPLIT in store.children("splits") else []
        held = all(store.is_array(f"{features_node(s, backbone)}/{n}") and
                   store.node_attrs(features_node(s, backbone)).get("complete") for s in splits for n in self.layers)
        return splits if held else []

    def complete_inputs(self, store, backbone, splits):
        if self.used_weights == "equal":
            why = "" if self.weights == "equal" else " (the store has no val and ood/val/... splits with these layers)"
            return [f"layers {', '.join(self.layers)}, equal weights{why}"]
        alpha = ", ".join(f"{a:.3g}" for a in self.state["alpha"])
        return [f"layers {', '.join(self.layers)}, weights {alpha} by logistic regression on "
                f"{self.val_splits[0]} against {', '.join(self.val_splits[1:])}"]

    def _fit_key(self, store, backbone, split, model_id):
        from oodcli.scorers.base import train_fingerprint

        key = super()._fit_key(store, backbone, split, model_id)
        if self.used_weights == "logistic":  # the weights are fitted on these splits too
            key["val_fingerprints"] = {s: train_fingerprint(store, backbone, s, self.layers) for s in self.val_splits}
        return key

    def fit(self, store, backbone, split):
        node = features_node(split, backbone)
        dims = [int(np.prod(store.shape(f"{node}/{n}")[1:2])) for n in self.layers]

        def labelled(what):
            for b in self.blocks(store, backbone, split, what, labels=True):
                yield [pooled(b[n]).astype(np.float64) for n in self.layers], b["labels"]

        sums, counts = [np.zeros((0, d)) for d in dims], np.zeros(0, np.int64)
        for xs, y in labelled("fit pass 1/2"):
            k = max(len(counts), int(y.max()) + 1)
            counts = np.pad(counts, (0, k - len(counts))) + np.bincount(y, minlength=k)
            for i, x in enumerate(xs):
                block_sums, _ = class_sums([(x, y)], dims[i])
                sums[i] = np.pad(sums[i], ((0, k - len(sums[i])), (0, 0)))
                sums[i][: len(block_sums)] += block_sums
        means = [s / np.maximum(counts, 1)[:, None] for s in sums]
        scatter = [np.zeros((d, d)) for d in dims]
        for xs, y in labelled("fit pass 2/2"):
            for i, x in enumerate(xs):
                diff = x - means[i][y]
                scatter[i] += diff.T @ diff
        classes = np.flatnonzero(counts)
        n = counts.sum()
        state = {"classes": classes}
        for i in range(len(self.layers)):
            state[f"means_{i}"] = means[i][classes]
            state[f"precision_{i}"] = np.linalg.pinv(scatter[i] / n, hermitian=True)
        self._gaussians(state)
        if self.used_weights == "equal":
            state["alpha"] = np.ones(len(self.layers))
        else:
            state["alpha"] = self._logistic(store, backbone)
        return state

    def _gaussians(self, state):
        self.gaussians = [Distances(state[f"means_{i}"], state[f"precision_{i}"]) for i in range(len(self.layers))]

    def confidences(self, batch) -> np.ndarray:
        """M_l per row and layer, [N, L]."""
        return np.stack([-g.min_sq(pooled(batch[n])) for g, n in zip(self.gaussians, self.layers)], axis=1)

    def _logistic(self, store, backbone) -> np.ndarray:
        import warnings

        from sklearn.linear_model import LogisticRegressionCV

        rows, target = [], []
        for split in self.val_splits:
            for b in self.blocks(store, backbone, split, f"weights on {split}"):
                m = self.confidences(b)
                rows.append(m)
                target.append(np.full(len(m), 1 if split == self.val_splits[0] else 0))
        x, y = np.concatenate(rows), np.concatenate(target)
        if len(np.unique(y)) < 2 or min(np.bincount(y)) < 5:
            raise OodError("mds-ensemble: the validation splits have too few rows to fit the layer weights "
                           "(5 ID and 5 OOD at least); use weights=equal")
        with warnings.catch_warnings():  # scikit-learn's notices of defaults changing in later releases
            warnings.simplefilter("ignore", FutureWarning)
            return LogisticRegressionCV().fit(x, y).coef_.reshape(-1).astype(np.float64)

    def ready(self, store, backbone, split):
        self._gaussians(self.state)

    def score_batch(self, batch):
        return self.confidences(batch) @ self.state["alpha"]
