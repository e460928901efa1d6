"""Make the WordNet lists that ship with oodcli, so NegLabel needs no installed WordNet.

    python -m oodcli.data.wordnet_vocabulary --wordnet /usr/share/wordnet --out oodcli/data/wordnet

reads ``data.noun`` and ``data.adj`` with the very parser NegLabel uses on a full
database (``negatives.wordnet_headwords``) and writes, into ``--out``:

- ``nouns.txt.gz``, ``adjectives.txt.gz``: one headword per line, gzip with mtime 0 and
  no file name, so the same database always gives the same bytes;
- ``LICENSE``: WordNet 3.0's licence, taken from the database files' own header;
- ``vocabulary.json``: the source, the counts, and the sha256 of the inputs and outputs.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
from pathlib import Path

from oodcli import negatives
from oodcli.errors import OodError

FILES = {"nouns": "nouns.txt.gz", "adjectives": "adjectives.txt.gz"}
_HEADER = re.compile(r"^  \d+ ?(.*?)\s*$")


def gzip_bytes(text: str) -> bytes:
    """Deterministic gzip: mtime 0, no embedded file name."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))
    return buf.getvalue()


def licence_text(lines: list[str]) -> str:
    """The licence header of a WordNet data file (its leading lines numbered after two spaces)."""
    out = []
    for line in lines:
        m = _HEADER.match(line)
        if not m:
            break
        out.append(m.group(1))
    return "\n".join(out).strip() + "\n"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def generate(wordnet: Path, out: Path) -> dict:
    """Write the lists, licence and metadata for the database at ``wordnet``; return the metadata."""
    where = negatives.find_wordnet(wordnet)
    nouns, adjs = negatives.wordnet_headwords(where)
    raw = {name: negatives.data_file_bytes(where, name) for name in ("data.noun", "data.adj")}
    licence = licence_text(raw["data.noun"].decode("utf-8", errors="replace").splitlines())
    if not licence.strip():
        raise OodError(f"{where}/data.noun has no licence header; is it a WordNet database?")
    version = re.search(r"WordNet (\d+(?:\.\d+)*)", licence)
    out.mkdir(parents=True, exist_ok=True)
    blobs = {FILES["nouns"]: gzip_bytes("".join(w + "\n" for w in nouns)),
             FILES["adjectives"]: gzip_bytes("".join(w + "\n" for w in adjs)),
             "LICENSE": licence.encode("utf-8")}
    for name, data in blobs.items():
        (out / name).write_bytes(data)
    meta = {
        "source": f"WordNet {version.group(1) if version else '(unknown version)'}, Princeton University",
        "made_by": "python -m oodcli.data.wordnet_vocabulary",
        "rule": "headword (first lemma) of each synset of data.noun then data.adj, '_' -> ' ', "
                "adjective markers (a)/(p)/(ip) dropped, deduplicated case-insensitively, first kept",
        "nouns": len(nouns),
        "adjectives": len(adjs),
        "inputs_sha256": {name: _sha256(data) for name, data in raw.items()},
        "outputs_sha256": {name: _sha256(data) for name, data in blobs.items()},
    }
    (out / "vocabulary.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oodcli.data.wordnet_vocabulary", description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"),
                        help="WordNet database folder (data.noun, data.adj) or nltk's wordnet.zip")
    parser.add_argument("--out", type=Path, default=negatives.SHIPPED, help="folder to write the lists into")
    args = parser.parse_args(argv)
    try:
        meta = generate(args.wordnet, args.out)
    except OodError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {meta['nouns']} nouns, {meta['adjectives']} adjectives from {meta['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
