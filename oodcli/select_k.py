"""How many prototypes each class needs: Gaussian mixtures scored by BIC (APEX, eq. 1).

For every ID class, GMMs with k' = K_min..K_max components are fitted to the class's
features and K_c* = argmin_k' BIC(k') = N(k', D) ln(n_c) - 2 ln L_c(k'), where N counts
the free parameters (scikit-learn's ``GaussianMixture.bic`` is exactly this).

Why the features are reduced first: with DINOv2-B features (D = 768) and ~500 images
per class, one full-covariance component has D(D+3)/2 ~ 296k free parameters, far more
than the data, so the likelihood is unbounded and BIC meaningless; even a diagonal
component (2D + 1 = 1537 parameters) costs ~9,500 BIC units per extra component,
which buries any real sub-cluster. So each class is projected onto its own top
``pca_dim`` principal axes (whitened), where a ``diag`` GMM is the default: in the PCA
basis the within-class covariance is close to diagonal and one component costs
2 * pca_dim + 1 parameters. The projection is shared by every candidate k' of a class,
so the BIC comparison between candidates stays fair. The default ``pca_dim`` = 8 comes
from synthetic checks (clusters ~8 sigma apart, 1, 2, 3 and 5 per class, 4 seeds): at
768-d with 500 points per class, 6 and 8 dims found every K (16/16) and 12 dims
over-split 3 classes by one; on isotropic 128-d mixtures of 1..8 clusters, 8 dims found
15/15, 16 dims 14/15 and 32 dims 7/15, the penalty hiding clusters from there on.

The result (K per class, the BIC curves, and the settings) is written to
``fitted/select_k/`` of the store, which ``oodcli train apex`` reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from oodcli import __version__
from oodcli.errors import OodError, UsageError
from oodcli.store import Store, features_node, split_node

NODE = "fitted/select_k"
COVARIANCES = ("diag", "full", "tied", "spherical")
DEFAULT_K_RANGE = (1, 10)  # contains PALM's fixed K = 6


@dataclass
class SelectKResult:
    classes: np.ndarray  # int64 [C], label values
    counts: np.ndarray  # int64 [C], samples per class
    k: np.ndarray  # int64 [C], K_c*
    candidates: np.ndarray  # int64 [J], the k' tried
    bic: np.ndarray  # float64 [C, J]; NaN where k' >= n_c
    dims: np.ndarray  # int64 [C], dimensions after reduction
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self, class_names: list[str] | None = None) -> dict:
        rows = []
        for i, c in enumerate(self.classes.tolist()):
            rows.append({
                "class": c,
                "name": class_names[c] if class_names and c < len(class_names) else None,
                "n": int(self.counts[i]),
                "k": int(self.k[i]),
                "dims": int(self.dims[i]),
                "bic": {int(k): (None if np.isnan(b) else float(b)) for k, b in zip(self.candidates, self.bic[i])},
            })
        return {
            "settings": self.settings,
            "total_prototypes": int(self.k.sum()),
            "mean_k": float(self.k.mean()) if len(self.k) else 0.0,
            "seconds": self.seconds,
            "classes": rows,
        }


def parse_k_range(text: str) -> tuple[int, int]:
    """'1..10' -> (1, 10)."""
    lo, sep, hi = text.partition("..")
    try:
        k_min, k_max = int(lo), int(hi)
    except ValueError:
        raise UsageError(f"--k-range '{text}' is not MIN..MAX (e.g. 1..10)") from None
    if not sep or k_min < 1 or k_max < k_min:
        raise UsageError(f"--k-range '{text}' must be MIN..MAX with 1 <= MIN <= MAX (e.g. 1..10)")
    return k_min, k_max


def reduce(x: np.ndarray, pca_dim: int, seed: int = 0) -> np.ndarray:
    """Project one class onto its top principal axes, whitened (0 = keep all dimensions)."""
    from sklearn.decomposition import PCA

    dim = min(pca_dim, x.shape[1], len(x) - 1) if pca_dim else x.shape[1]
    if dim < 1:
        return x - x.mean(0)
    return PCA(dim, whiten=True, svd_solver="randomized", random_state=seed).fit_transform(x)


def bic_curve(
    x: np.ndarray, candidates, covariance: str = "diag", n_init: int = 3, seed: int = 0
) -> np.ndarray:
    """BIC of a GMM for each candidate number of components (NaN when k' >= samples)."""
    from sklearn.mixture import GaussianMixture

    out = np.full(len(candidates), np.nan)
    for j, k in enumerate(candidates):
        if k >= len(x) and k > 1:
            continue
        gmm = GaussianMixture(
            k, covariance_type=covariance, n_init=n_init, init_params="k-means++", random_state=seed
        )
        out[j] = gmm.fit(x).bic(x)
    return out


def check_settings(covariance: str, pca_dim: int, n_init: int) -> None:
    if covariance not in COVARIANCES:
        raise UsageError(f"unknown --covariance '{covariance}'; use one of {', '.join(COVARIANCES)}")
    if pca_dim < 0 or n_init < 1:
        raise UsageError("--pca-dim must be >= 0 and --n-init >= 1")


def select_k_arrays(
    x: np.ndarray,
    y: np.ndarray,
    k_range: tuple[int, int] = DEFAULT_K_RANGE,
    covariance: str = "diag",
    pca_dim: int = 8,
    n_init: int = 3,
    seed: int = 0,
    progress=None,
) -> SelectKResult:
    """K_c* for every class of in-memory features ``x`` [N, D] with labels ``y`` [N]."""
    from threadpoolctl import threadpool_limits

    check_settings(covariance, pca_dim, n_init)
    t0 = time.perf_counter()
    candidates = np.arange(k_range[0], k_range[1] + 1)
    classes = np.unique(y)
    classes = classes[classes >= 0]
    counts, ks, dims, curves = [], [], [], []
    # the matrices are small (n_c x pca_dim): BLAS threads only add overhead (4x slower measured)
    with threadpool_limits(1):
        for c in classes:
            xc = x[y == c].astype(np.float64)
            z = reduce(xc, pca_dim, seed)
            curve = bic_curve(z, candidates, covariance, n_init, seed)
            if np.isnan(curve).all():
                raise OodError(f"class {c} has {len(xc)} sample(s): too few for any K in {k_range[0]}..{k_range[1]}")
            counts.append(len(xc))
            dims.append(z.shape[1])
            curves.append(curve)
            ks.append(int(candidates[np.nanargmin(curve)]))
            if progress:
                progress(1)
    settings = {"k_range": list(k_range), "covariance": covariance, "pca_dim": pca_dim, "n_init": n_init, "seed": seed}
    return SelectKResult(
        classes=classes.astype(np.int64),
        counts=np.asarray(counts, np.int64),
        k=np.asarray(ks, np.int64),
        candidates=candidates.astype(np.int64),
        bic=np.asarray(curves, np.float64).reshape(len(classes), len(candidates)),
        dims=np.asarray(dims, np.int64),
        settings=settings,
        seconds=time.perf_counter() - t0,
    )


def default_layer(store: Store, backbone: str, split: str) -> str:
    """DINOv2's ``cls`` if it was extracted, else ``penultimate``."""
    node = features_node(split, backbone)
    for layer in ("cls", "penultimate"):
        if store.is_array(f"{node}/{layer}"):
            return layer
    raise UsageError(f"split '{split}' has no '{backbone}' cls or penultimate features; pass --layer NAME")


def read_features(store: Store, backbone: str, layer: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's features (float32) and labels, streamed in chunks; ID rows only."""
    from oodcli.scorers.base import check_features, iter_feature_blocks

    check_features(store, backbone, split, (layer,))
    xs, ys = [], []
    for block in iter_feature_blocks(store, backbone, split, (layer,), labels=True):
        xs.append(block[layer].reshape(len(block[layer]), -1))
        ys.append(block["labels"])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if (y < 0).any():
        raise OodError(f"split '{split}' holds OOD rows (label -1); select K on the ID train split")
    if len(x) == 0:
        raise OodError(f"split '{split}' is empty")
    return x, y


def select_k(
    store: Store,
    backbone: str | None = None,
    layer: str | None = None,
    split: str = "train",
    k_range: tuple[int, int] = DEFAULT_K_RANGE,
    covariance: str = "diag",
    pca_dim: int = 8,
    n_init: int = 3,
    seed: int = 0,
    progress=None,
) -> SelectKResult:
    """Run selection on a store's features and write ``fitted/select_k`` (only once all is done)."""
    check_settings(covariance, pca_dim, n_init)
    if not store.exists(split_node(split)):
        raise OodError(f"store {store.path} has no split '{split}'; extract it first")
    if backbone is None:
        from oodcli.scoring import default_backbone

        backbone = default_backbone(store, split)
    layer = layer or default_layer(store, backbone, split)
    x, y = read_features(store, backbone, layer, split)
    advance = progress(len(np.unique(y))) if progress else None
    result = select_k_arrays(x, y, k_range, covariance, pca_dim, n_init, seed, advance)
    attrs = store.node_attrs(features_node(split, backbone))
    result.settings |= {"backbone": backbone, "layer": layer, "split": split,
                        "model_id": attrs.get("model_id"), "fingerprint": attrs.get("fingerprint")}
    with store.transaction() as txn:  # fitted/select_k is replaced whole or not at all
        node = txn.stage(NODE)
        store.require_group(node)
        for name in ("classes", "counts", "k", "candidates", "bic", "dims"):
            store.write_array(f"{node}/{name}", getattr(result, name))
        store.set_attrs(node, **result.settings, seconds=result.seconds, oodcli_version=__version__, complete=True)
    return result


def read_k(store: Store) -> dict[int, int]:
    """The K per class that select-k wrote: {class label: K_c*}."""
    if not (store.exists(NODE) and store.node_attrs(NODE).get("complete")):
        raise OodError(f"store {store.path} has no select-k result; run 'oodcli select-k --store {store.path}' first")
    classes, k = store.read(f"{NODE}/classes"), store.read(f"{NODE}/k")
    return {int(c): int(v) for c, v in zip(classes, k)}
