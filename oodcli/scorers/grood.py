"""GROOD, gradient-aware OOD detection (paper 004, Sec. 4), and the ablations of its Table 4.

The math lives here; the prototypes it needs come from ``oodcli synthesize grood``
(``oodcli/synth/grood.py``), which keeps them under ``fitted/grood`` and then writes
the gradient of every split with ``write_gradients``. A split added later (e.g. a new
OOD set) needs nothing but its stored penultimate features and those prototypes: ``score
grood`` (and ``grood-gradnorm``) write its gradients then (``ensure_gradients``), and the
index stays the one built over the train gradients:

- logits are minus the L2 distances of a penultimate feature h to the C class
  prototypes and the OOD prototype (eq. 2), turned into probabilities by a softmax
  (eq. 3); the last one is p_ood(h);
- the gradient of the cross-entropy H(h, y) (eq. 4) for any ID label y with respect to
  the OOD prototype has the closed form p_ood(h) (h - p_ood) / ||h - p_ood|| (eq. 5,
  App. A.6), kept as ``grads/grood/<split>`` [N, D] float32;
- the score is minus the distance to the nearest train gradient (eq. 6), searched in a
  faiss index built with ``oodcli index --source grads/grood/train``.

Ablations (Table 4, Fig. 5) are their own methods so that one report compares them:
``grood-distance`` (distance to the OOD prototype only), ``grood-gradnorm`` (gradient
L1 norm only), ``grood-classgrad`` (gradients w.r.t. the class prototypes instead),
and ``--param grood.k=K`` (distance to the k-th nearest train gradient).
"""

from __future__ import annotations


import numpy as np

from oodcli import index as faiss_index
from oodcli.errors import OodError, UsageError
from oodcli.scorers.base import Progress, Scorer, iter_feature_blocks, no_progress, register, train_fingerprint
from oodcli.scorers.logits import softmax
from oodcli.store import Store, digest, features_node, list_splits

STATE_NODE = "fitted/grood"
GRADS = "grads/grood"
LAYER = "penultimate"
EPS = 1e-12  # guards the unit vector of a feature that sits exactly on a prototype


# ---- the math (eq. 2-5) -------------------------------------------------------------------


def prototype_distances(h: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """L2 distances [N, K] of rows of ``h`` to each prototype, in float64."""
    h, p = np.asarray(h, np.float64), np.asarray(prototypes, np.float64)
    sq = (h * h).sum(1)[:, None] - 2.0 * h @ p.T + (p * p).sum(1)[None, :]
    return np.sqrt(np.maximum(sq, 0.0))


def ncp_probabilities(h: np.ndarray, class_prototypes: np.ndarray, ood_prototype: np.ndarray) -> np.ndarray:
    """Softmax over minus the distances to the C class prototypes and the OOD prototype
    (eq. 2-3): [N, C + 1], p_ood last."""
    protos = np.vstack([class_prototypes, np.asarray(ood_prototype)[None, :]])
    return softmax(-prototype_distances(h, protos), axis=1)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), EPS)


def ood_gradients(h: np.ndarray, class_prototypes: np.ndarray, ood_prototype: np.ndarray) -> np.ndarray:
    """Eq. 5: grad of H(h, y) w.r.t. the OOD prototype, for any ID label y:
    p_ood(h) (h - p_ood) / ||h - p_ood||. Its L2 norm is p_ood(h)."""
    h = np.asarray(h, np.float64)
    p_ood = ncp_probabilities(h, class_prototypes, ood_prototype)[:, -1]
    return p_ood[:, None] * _unit(h - np.asarray(ood_prototype, np.float64))


def class_gradients(h: np.ndarray, class_prototypes: np.ndarray, ood_prototype: np.ndarray) -> np.ndarray:
    """Ablation (3): grad of H(h, c) w.r.t. the prototype of the predicted class c (the
    nearest one): (p_c(h) - 1) (h - p_c) / ||h - p_c||, the same shape of signal as eq. 5
    (norm 1 - p_c, the probability of anything else) but anchored on an ID prototype."""
    h = np.asarray(h, np.float64)
    cp = np.asarray(class_prototypes, np.float64)
    probs = ncp_probabilities(h, cp, ood_prototype)
    c = probs[:, :-1].argmax(1)
    return (probs[np.arange(len(h)), c] - 1.0)[:, None] * _unit(h - cp[c])


# ---- fitted state and the gradient store --------------------------------------------------


def grads_node(split: str) -> str:
    return f"{GRADS}/{split}"


def _synthesize_hint(store: Store) -> str:
    return f"'oodcli synthesize grood --store {store.path}'"


def load_state(store: Store, backbone: str, train_split: str, model_id: str | None) -> dict:
    """The prototypes under ``fitted/grood``, refused when missing, unfinished or made
    from other train features than the store holds now."""
    attrs = store.node_attrs(STATE_NODE) if store.exists(STATE_NODE) else {}
    if not attrs.get("complete"):
        raise OodError(f"store {store.path} has no GROOD prototypes (fitted/grood); run {_synthesize_hint(store)} first")
    now = {
        "backbone": backbone,
        "model_id": model_id,
        "train_split": train_split,
        "train_fingerprint": train_fingerprint(store, backbone, train_split, (LAYER,)),
    }
    stale = [k for k, v in now.items() if attrs.get(k) != v]
    if stale:
        raise OodError(
            f"the GROOD prototypes in fitted/grood were made from other train features ({', '.join(stale)} differ); "
            f"re-run {_synthesize_hint(store)}"
        )
    state = {k: store.read(f"{STATE_NODE}/{k}") for k in ("class_prototypes", "ood_prototype", "classes")}
    return state | dict(attrs.get("scalars", {})) | {"prototype_id": attrs["prototype_id"]}


def gradient_fingerprint(store: Store, backbone: str, split: str, prototype_id: str) -> str:
    parts = [prototype_id, train_fingerprint(store, backbone, split, (LAYER,))]
    return digest(parts)


def gradients_current(store: Store, backbone: str, split: str, state: dict) -> bool:
    """Whether ``grads/grood/<split>`` is whole and made from this split's features and these prototypes."""
    node = grads_node(split)
    if not store.is_array(node):
        return False
    attrs = store.node_attrs(node)
    return bool(attrs.get("complete")) and attrs.get("fingerprint") == gradient_fingerprint(
        store, backbone, split, state["prototype_id"])


def write_split_gradients(store: Store, backbone: str, split: str, state: dict,
                          progress: Progress = no_progress) -> dict:
    """Eq. 5 for every row of one split, from its stored penultimate features and the
    prototypes in ``state``, as ``grads/grood/<split>`` (in one transaction: whole or not
    at all); left alone when current. Returns ``{split, rows, status}``."""
    node = features_node(split, backbone)
    rows, dim = store.shape(f"{node}/{LAYER}")
    if gradients_current(store, backbone, split, state):
        return {"split": split, "rows": rows, "status": "cached"}
    owner = store.node_attrs(STATE_NODE).get("model_id") if store.exists(STATE_NODE) else None
    if owner is not None and store.node_attrs(node).get("model_id") != owner:
        raise OodError(f"split '{split}' was extracted with other '{backbone}' weights than the GROOD prototypes "
                       f"were made from; re-extract it with the train split's weights")
    if not store.writable:
        raise OodError(f"split '{split}' has no GROOD gradients yet and store {store.path} is open read-only; "
                       "open it writable to make them")
    fingerprint = gradient_fingerprint(store, backbone, split, state["prototype_id"])
    with store.transaction() as txn:  # a split's gradients land whole or not at all
        staged = txn.stage(grads_node(split))
        store.create_array(staged, (rows, dim), np.float32, chunk_rows=store.chunk_rows(f"{node}/{LAYER}"))
        advance = progress(f"grood: gradients {split}", rows)
        start = 0
        for block in iter_feature_blocks(store, backbone, split, (LAYER,)):
            grads = ood_gradients(block[LAYER], state["class_prototypes"], state["ood_prototype"])
            store.write_rows(staged, start, grads.astype(np.float32))
            start += len(grads)
            advance(len(grads))
        store.set_attrs(staged, fingerprint=fingerprint, prototype_id=state["prototype_id"], backbone=backbone,
                        features=f"{node}/{LAYER}", formula="GROOD eq. 5", complete=True)
    return {"split": split, "rows": rows, "status": "written"}


def write_gradients(store: Store, backbone: str, state: dict, progress: Progress = no_progress) -> list[dict]:
    """Eq. 5 for every row of every split extracted with the train split's model, as
    ``grads/grood/<split>``; a split whose gradients are current is left alone."""
    model_id = store.node_attrs(STATE_NODE).get("model_id")
    done = []
    for split in list_splits(store):
        node = features_node(split, backbone)
        attrs = store.node_attrs(node) if store.exists(node) else {}
        if not (attrs.get("complete") and attrs.get("model_id") == model_id and store.is_array(f"{node}/{LAYER}")):
            continue
        done.append(write_split_gradients(store, backbone, split, state, progress))
    return done


def check_gradients(store: Store, backbone: str, split: str, state: dict) -> str:
    """The node of a split's current gradients, or a one-line error saying how to make them."""
    node = grads_node(split)
    attrs = store.node_attrs(node) if store.is_array(node) else {}
    if not attrs.get("complete") or attrs.get("fingerprint") != gradient_fingerprint(
        store, backbone, split, state["prototype_id"]
    ):
        raise OodError(
            f"split '{split}' has no GROOD gradients for the current prototypes ({node}); re-run "
            f"{_synthesize_hint(store)} (it reuses the prototypes and writes only the gradients)"
        )
    return node


# ---- scorers --------------------------------------------------------------------------------


class _GroodScorer(Scorer):
    """Shared life cycle: the state comes from ``oodcli synthesize grood`` (it needs the
    backbone, which a scorer never runs), so ``prepare`` loads and checks it instead of fitting.

    Scorers that read the gradient store (``uses_gradients``) make the gradients of a split
    that has none yet from its stored features (``complete_inputs``, called by
    ``oodcli.scoring`` before scoring, and again lazily by ``gradient_blocks``)."""

    layers = (LAYER,)
    needs_fit = True
    min_train_classes = 2
    uses_gradients = False

    def check_inputs(self, store: Store, backbone: str, train_split: str, model_id: str | None) -> None:
        """Load the state, refusing inputs that are missing or stale with a one-line error."""
        self.state = load_state(store, backbone, train_split, model_id)

    def applicable(self, store, backbone, train_split):
        """'score all' includes it once 'oodcli synthesize grood' (and for grood 'oodcli index') made its inputs."""
        try:
            self.check_inputs(store, backbone, train_split,
                              store.node_attrs(features_node(train_split, backbone)).get("model_id"))
        except OodError:
            return False
        return True

    def prepare(self, store, backbone, train_split, model_id):
        self.check_inputs(store, backbone, train_split, model_id)
        self.ready(store, backbone, train_split)
        return "cached"

    def complete_inputs(self, store: Store, backbone: str, splits: list[str]) -> list[str]:
        """Write the gradients of every split in ``splits`` that has none for the current
        prototypes (eq. 5 needs only its penultimate features); returns one note per split written."""
        if not self.uses_gradients:
            return []
        notes = []
        for split in splits:
            if write_split_gradients(store, backbone, split, self.state, self.progress)["status"] == "written":
                notes.append(f"wrote grads/grood/{split} from its penultimate features and the stored prototypes "
                             "(eq. 5; no synthesize needed)")
        return notes

    def gradients(self, batch) -> np.ndarray:
        """Eq. 5 for rows given as features, in the dtype the gradient store keeps."""
        return ood_gradients(batch[LAYER], self.state["class_prototypes"], self.state["ood_prototype"]).astype(np.float32)

    def gradient_blocks(self, store: Store, backbone: str, split: str):
        if not gradients_current(store, backbone, split, self.state):
            self.complete_inputs(store, backbone, [split])
        node = check_gradients(store, backbone, split, self.state)
        advance = self.progress(f"{self.name}: score {split}", store.shape(node)[0])
        for _, block in store.iter_rows(node):
            yield block.astype(np.float32)
            advance(len(block))

    def _check_k(self, rows: int) -> None:
        if self.k > rows:
            raise UsageError(f"{self.name}.k={self.k} but there are only {rows} train gradients; pick a smaller k")

    def _nearest(self, grads: np.ndarray) -> np.ndarray:
        distances, _ = faiss_index.search(self.searcher, grads, self.k)
        return -distances[:, -1]

    def release(self):
        self.searcher = None  # the faiss index built or loaded by ``ready``


@register
class GROOD(_GroodScorer):
    """Minus the distance to the k-th nearest train gradient w.r.t. the OOD prototype (GROOD eq. 6); after synthesize + index."""

    name = "grood"
    uses_gradients = True

    def __init__(self, k: int = 1, index: str = ""):
        self.k = int(k)
        self.index = str(index)  # a name under index/; "" = the index built from grads/grood/<train split>
        if self.k < 1:
            raise ValueError("k must be >= 1")

    def check_inputs(self, store, backbone, train_split, model_id):
        super().check_inputs(store, backbone, train_split, model_id)
        source = check_gradients(store, backbone, train_split, self.state)
        self.index_name = self.index or source
        attrs = faiss_index.stored_attrs(store, self.index_name)
        faiss_index.check_built_from(store, self.index_name, attrs, source)
        self._check_k(int(attrs["rows"]))

    def ready(self, store, backbone, split):
        self.searcher, _ = faiss_index.load(store, self.index_name)

    def score(self, store, backbone, split):
        out = [self._nearest(g) for g in self.gradient_blocks(store, backbone, split)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def score_features(self, batch):
        """Eq. 5's gradients of the given rows, computed as 'grads/grood' stores them, then the search."""
        return self._nearest(self.gradients(batch))


@register
class GroodDistance(_GroodScorer):
    """GROOD ablation (1): distance of the penultimate feature to the OOD prototype (far from it = ID)."""

    name = "grood-distance"

    def __init__(self):
        pass

    def score_batch(self, batch):
        return prototype_distances(batch[LAYER], self.state["ood_prototype"][None, :])[:, 0]


@register
class GroodGradNorm(_GroodScorer):
    """GROOD ablation (2): minus the L1 norm of the gradient w.r.t. the OOD prototype."""

    name = "grood-gradnorm"
    uses_gradients = True

    def __init__(self):
        pass

    def score(self, store, backbone, split):
        out = [-np.abs(g).sum(1) for g in self.gradient_blocks(store, backbone, split)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def score_features(self, batch):
        return -np.abs(self.gradients(batch)).sum(1)


@register
class GroodClassGrad(_GroodScorer):
    """GROOD ablation (3): like grood, with gradients w.r.t. the predicted class prototype instead of the OOD one."""

    name = "grood-classgrad"

    def __init__(self, k: int = 1):
        self.k = int(k)
        if self.k < 1:
            raise ValueError("k must be >= 1")

    def _grads(self, h: np.ndarray) -> np.ndarray:
        return class_gradients(h, self.state["class_prototypes"], self.state["ood_prototype"])

    def check_inputs(self, store, backbone, train_split, model_id):
        super().check_inputs(store, backbone, train_split, model_id)
        self._check_k(store.shape(f"{features_node(train_split, backbone)}/{LAYER}")[0])  # before any work

    def ready(self, store, backbone, split):
        """An in-memory index over the train class gradients (computed on the fly: they are
        an ablation, not worth a gradient store of their own)."""
        rows, dim = store.shape(f"{features_node(split, backbone)}/{LAYER}")
        self._check_k(rows)
        advance = self.progress(f"{self.name}: build index", rows)

        def blocks():
            for block in iter_feature_blocks(store, backbone, split, (LAYER,)):
                yield self._grads(block[LAYER])

        self.searcher = faiss_index.build(blocks, rows, dim, advance=advance)

    def score_batch(self, batch):
        return self._nearest(self._grads(batch[LAYER]))
