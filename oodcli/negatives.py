"""NegLabel's negative labels (Jiang et al., ICLR 2024): WordNet words far from the ID labels.

The corpus is WordNet's nouns and adjectives. Each synset contributes its headword (the
first lemma), deduplicated, so a word stands for its most common sense once.
``load_vocabulary`` finds them: an explicit database folder; else an installed full
WordNet (Debian's ``wordnet-base`` at /usr/share/wordnet, nltk's corpus under
``~/nltk_data/corpora/wordnet`` or its ``wordnet.zip``; no nltk needed); else the lists
shipped in ``oodcli/data/wordnet`` (made from WordNet 3.0 by
``python -m oodcli.data.wordnet_vocabulary``), so NegLabel runs on a fresh machine.

NegMining: every candidate's distance to the ID label set is its ``percentile``-quantile
cosine similarity to the ID prototypes in CLIP text space; the ``count`` candidates with
the lowest similarity are kept, the same share of nouns and of adjectives.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oodcli.errors import OodError, UsageError

GET_WORDNET = (
    "install it with 'apt-get install wordnet-base' (gives /usr/share/wordnet) or "
    "'python -m nltk.downloader wordnet', or point --param neglabel.wordnet=DIR at a folder holding data.noun and data.adj"
)
SHIPPED = Path(__file__).parent / "data" / "wordnet"  # nouns.txt.gz, adjectives.txt.gz, LICENSE, vocabulary.json
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective syntactic markers: (a), (p), (ip)


def default_locations() -> list[Path]:
    """Where WordNet is looked for, in order: $OODCLI_WORDNET, nltk's data dirs, Debian's wordnet-base."""
    places = [os.environ["OODCLI_WORDNET"]] if os.environ.get("OODCLI_WORDNET") else []
    nltk_dirs = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    nltk_dirs += ["~/nltk_data", f"{sys.prefix}/nltk_data", f"{sys.prefix}/share/nltk_data",
                  "/usr/share/nltk_data", "/usr/local/share/nltk_data", "/usr/lib/nltk_data", "/usr/local/lib/nltk_data"]
    for d in nltk_dirs:
        places += [f"{d}/corpora/wordnet", f"{d}/corpora/wordnet.zip"]
    places.append("/usr/share/wordnet")
    return [Path(p).expanduser() for p in places]


def _has_wordnet(path: Path) -> bool:
    if path.is_dir():
        return (path / "data.noun").is_file() and (path / "data.adj").is_file()
    if path.suffix == ".zip" and path.is_file():
        with zipfile.ZipFile(path) as z:
            names = {Path(n).name for n in z.namelist()}
        return {"data.noun", "data.adj"} <= names
    return False


def find_wordnet(path: str | Path | None = None) -> Path:
    """The WordNet database to read: ``path`` if given, else the first default location that has one."""
    if path is not None:
        p = Path(path).expanduser()
        if not _has_wordnet(p):
            raise OodError(f"no WordNet database (data.noun, data.adj) at {p}; {GET_WORDNET}")
        return p
    for p in default_locations():
        if _has_wordnet(p):
            return p
    raise OodError(f"NegLabel needs WordNet and none was found; {GET_WORDNET}")


def data_file_bytes(location: Path, name: str) -> bytes:
    """The raw bytes of ``name`` (e.g. data.noun) in a WordNet folder or nltk's zip."""
    if location.is_dir():
        return (location / name).read_bytes()
    with zipfile.ZipFile(location) as z:
        member = next(n for n in z.namelist() if Path(n).name == name)
        return z.read(member)


def _read_data_file(location: Path, name: str) -> list[str]:
    return data_file_bytes(location, name).decode("utf-8", errors="replace").splitlines()


def headwords(lines: list[str]) -> list[str]:
    """The first lemma of each synset line of a WordNet ``data.*`` file, as plain words.

    A synset line reads ``offset lex_filenum ss_type w_cnt word lex_id ...``; the
    licence header lines start with spaces.
    """
    words = []
    for line in lines:
        if not line or line[0] == " ":
            continue
        fields = line.split(" ", 5)
        if len(fields) < 5:
            continue
        words.append(_MARKER.sub("", fields[4]).replace("_", " "))
    return words


def wordnet_headwords(location: Path) -> tuple[list[str], list[str]]:
    """(nouns, adjectives) of a WordNet database: headwords deduplicated case-insensitively,
    first occurrence kept, across both files (an adjective that is also a noun stays a noun)."""
    seen: set[str] = set()
    out = []
    for name in ("data.noun", "data.adj"):
        words = []
        for w in headwords(_read_data_file(location, name)):
            if w.lower() not in seen:
                seen.add(w.lower())
                words.append(w)
        out.append(words)
    if not out[0] and not out[1]:
        raise OodError(f"WordNet at {location} holds no nouns or adjectives; {GET_WORDNET}")
    return out[0], out[1]


def without(words: list[str], exclude) -> list[str]:
    """``words`` less the ``exclude`` names (case-insensitive): the ID labels are no negatives.

    Filtering the deduplicated lists afterwards equals skipping the names while
    deduplicating, since a skipped name never hides a later word but its own duplicates.
    """
    drop = {w.lower() for w in exclude}
    return [w for w in words if w.lower() not in drop]


def read_wordnet(location: Path, exclude: list[str] = ()) -> tuple[list[str], list[str]]:
    """(nouns, adjectives) of the database at ``location``, without the ``exclude`` names (the ID labels)."""
    nouns, adjs = wordnet_headwords(location)
    return without(nouns, exclude), without(adjs, exclude)


@dataclass(frozen=True)
class Vocabulary:
    """NegLabel's candidate words and where they came from (a database path or the shipped lists)."""

    nouns: list[str]
    adjectives: list[str]
    source: str

    def candidates(self, exclude=()) -> tuple[list[str], list[str]]:
        return without(self.nouns, exclude), without(self.adjectives, exclude)


def _read_gz_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [ln for ln in f.read().split("\n") if ln]


def shipped_vocabulary() -> Vocabulary:
    """The WordNet 3.0 nouns and adjectives that ship with oodcli (package data)."""
    try:
        meta = json.loads((SHIPPED / "vocabulary.json").read_text(encoding="utf-8"))
        nouns, adjs = _read_gz_lines(SHIPPED / "nouns.txt.gz"), _read_gz_lines(SHIPPED / "adjectives.txt.gz")
    except (OSError, ValueError) as exc:
        raise OodError(f"oodcli's shipped WordNet lists in {SHIPPED} are unreadable ({exc}); reinstall oodcli or {GET_WORDNET}") from None
    if (len(nouns), len(adjs)) != (meta.get("nouns"), meta.get("adjectives")):
        raise OodError(f"oodcli's shipped WordNet lists in {SHIPPED} are damaged (counts disagree with vocabulary.json); reinstall oodcli")
    return Vocabulary(nouns, adjs, f"shipped:{meta.get('source', 'WordNet')}")


def load_vocabulary(wordnet: str | Path | None = None) -> Vocabulary:
    """NegLabel's candidates: the database at ``wordnet`` if given (an error if there is none
    there); else the first installed full WordNet (``default_locations``); else the shipped lists."""
    if wordnet is not None:
        where = find_wordnet(wordnet)
        return Vocabulary(*wordnet_headwords(where), str(where))
    for where in default_locations():
        if _has_wordnet(where):
            return Vocabulary(*wordnet_headwords(where), str(where))
    return shipped_vocabulary()


def percentile_similarity(candidates: np.ndarray, prototypes: np.ndarray, percentile: float, rows: int = 4096) -> np.ndarray:
    """Per candidate, the ``percentile``-quantile of its cosine similarities to the ID prototypes."""
    import torch  # only when mining runs; a mined set read back from the store needs none
    protos = torch.from_numpy(np.ascontiguousarray(prototypes, np.float32))
    out = []
    for i in range(0, len(candidates), rows):
        sims = torch.from_numpy(np.ascontiguousarray(candidates[i : i + rows], np.float32)) @ protos.T
        out.append(torch.quantile(sims, percentile, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def select_negatives(
    noun_emb: np.ndarray, adj_emb: np.ndarray, prototypes: np.ndarray, count: int, percentile: float
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the chosen nouns and adjectives: the ``count`` least ID-like candidates,
    split between nouns and adjectives in proportion to their numbers (as NegLabel does)."""
    total = len(noun_emb) + len(adj_emb)
    if not 0 < count <= total:
        raise UsageError(
            f"NegLabel asks for {count} negative labels but WordNet offers {total} candidate words; "
            "set --param neglabel.num_negatives to at most that"
        )
    if not 0.0 <= percentile <= 1.0:
        raise UsageError(f"neglabel.percentile must lie in [0, 1], not {percentile}")
    n_nouns = min(len(noun_emb), round(count * len(noun_emb) / total))
    n_adjs = count - n_nouns
    if n_adjs > len(adj_emb):
        n_adjs, n_nouns = len(adj_emb), count - len(adj_emb)
    picks = []
    for emb, n in ((noun_emb, n_nouns), (adj_emb, n_adjs)):
        d = percentile_similarity(emb, prototypes, percentile)
        picks.append(np.sort(np.argsort(d, kind="stable")[:n]))
    return picks[0], picks[1]


def mine_negative_labels(
    encode,
    prototypes: np.ndarray,
    nouns: list[str],
    adjectives: list[str],
    count: int,
    percentile: float,
    noun_template: str,
    adj_template: str,
    progress=None,
) -> tuple[list[str], np.ndarray, int]:
    """(words, embeddings [count, D], how many are nouns): NegMining over the given words.

    ``encode(texts, advance)`` returns L2-normalised text embeddings, e.g. a ``TextEncoder``.
    """
    total = len(nouns) + len(adjectives)
    advance = progress(f"neglabel: encode {total} WordNet words", total) if progress else None
    noun_emb = encode([noun_template.format(w) for w in nouns], advance)
    adj_emb = encode([adj_template.format(w) for w in adjectives], advance)
    pick_n, pick_a = select_negatives(noun_emb, adj_emb, prototypes, count, percentile)
    words = [nouns[i] for i in pick_n] + [adjectives[i] for i in pick_a]
    return words, np.concatenate([noun_emb[pick_n], adj_emb[pick_a]]), len(pick_n)
