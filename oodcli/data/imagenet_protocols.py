"""Maintenance script: rebuild NegPrompt's ImageNet-1K hard OOD benchmarks.

NegPrompt (Li et al., "Learning Transferable Negative Prompts for Out-of-Distribution
Detection", CVPR 2024, Table 1 and sec. 4.1) splits ImageNet-1K into ID and OOD classes:

* Split-1..Split-3 are the open-set protocols P1-P3 of Palechor, Bhoumik and Günther,
  "Large-scale open-set classification protocols for ImageNet" (WACV 2023). A protocol has
  *known* classes (ID here), *negative* classes (seen as "reject" samples while training an
  open-set classifier) and *unknown* classes (OOD here). NegPrompt tests on the known and
  the unknown classes only and never uses the negatives, so the benchmarks built here leave
  them out too (their count is printed, for comparison with the published lists).
* Split-4 is the first 100 ImageNet-1K classes as ID and the other 900 as OOD.

This module is not used at run time: it writes ``imagenet-p1.json``, ``imagenet-p2.json``,
``imagenet-p3.json`` and ``imagenet-split4.json`` (the class lists shipped as data) and
prints the class counts. Run it only to regenerate those files::

    python -m oodcli.data.imagenet_protocols --wordnet /usr/share/wordnet --out oodcli/data/benchmarks

It reads WordNet 3.0's ``data.noun`` (Debian/Ubuntu: ``apt-get install wordnet-base``), the
1000 ImageNet-1K WordNet ids in label order (``--synsets``, one per line; by default timm's
copy), and the ImageNet class names from the shipped ``imagenet.json``. ImageNet ids are
WordNet 3.0 noun offsets (``n`` + 8 digits).

How the classes are chosen
--------------------------
The protocols take the ImageNet classes below WordNet superclasses in the ImageNet hierarchy
of the ``robustness`` library, which the protocol code uses. That hierarchy is a *tree*: it
is read from ImageNet's ``wordnet.is_a.txt`` (parent-child pairs of WordNet 3.0) and every
synset keeps only the parent listed last there, so a class with two hypernyms (e.g.
"domestic cat": cat and domestic animal) belongs to one branch only. ``wordnet.is_a.txt`` is
no longer distributed, and which parent it lists last follows no rule that WordNet shows.
This script therefore rebuilds the tree from WordNet 3.0 and fixes the parent of every
synset with several hypernyms whose choice changes a protocol (``PARENT``, 26 synsets). Each
choice was read off the protocol files published with the original code (which classes the
P1-P3 test lists hold as known, negative and unknown) and agrees with the per-superclass
class counts noted in the original P3 code (e.g. 52 birds, 8 felines, 7 fruits). A synset
with several hypernyms outside the table takes its first one, and the script stops if that
choice would change a protocol, so another WordNet cannot change the lists silently.

Superclasses and rules (WordNet ids; "below X" = ImageNet classes whose parent chain in the
tree passes through X, sorted by wnid, which is ImageNet label order):

* P1: known = below dog n02084071; negatives = below fox n02118333, wild dog n02115335,
  wolf n02114100, feline n02120997, bear n02131653, musteline mammal n02441326, ungulate
  n02370806, primate n02469914; unknown = below food (solid food) n07555863, motor vehicle
  n03791235, device n03183080.
* P2: the classes below hunting dog n02087122 in wnid order; the first half (rounded down)
  are known, the rest negatives; unknown = below toy dog n02085374, fox, wild dog, wolf,
  feline, bear, musteline mammal, ungulate (ids as in P1).
* P3: for each of 13 superclasses -- dog n02084071, bird n01503061, insect n02159955,
  furniture n03405725, fish n02512053, monkey n02484322, car n02958343, feline n02120997,
  truck n04490091, fruit n13134947, fungus n12992868, boat n02858304, computer n03082979
  (the ``mixed_13`` group of ``robustness``) -- the classes below it in wnid order go by
  their position i there: even i known, odd i divisible by 3 unknown, other odd i negative;
  plus as unknown everything below reptile n01661091, clothing n03051540, ungulate
  n02370806, vegetable n07707451 and aircraft n02686568. A class listed twice counts once.

Counts (known / negative / unknown), those of the published protocol lists: P1 116 / 67 / 166,
P2 30 / 31 / 55, P3 151 / 97 / 164.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.util import find_spec
from pathlib import Path

DATA_DIR = Path(__file__).parent
BENCHMARK_DIR = DATA_DIR / "benchmarks"
PROMPT_FILE = "imagenet_clip_classes.txt"
DATA_ROOT_LAYOUT = "imagenet/train and imagenet/val under the data root (one sub-folder per class, wnid order)"

# The hypernym each multi-parent synset keeps in the protocols' ImageNet tree, where the choice
# changes a protocol (see the module docstring). synset: (kept parent, names for the reader).
PARENT = {
    "n02090827": ("n02384858", "greyhound -> racer, not hound: Italian greyhound and whippet are no dogs in P1/P2"),
    "n02121808": ("n01317541", "domestic cat -> domestic animal, not cat: house cats are no felines"),
    "n02153203": ("n02152991", "game bird -> game, not gallinaceous bird: grouse, quail... are no birds"),
    "n02916936": ("n02862048", "bulletproof vest -> body armor, not vest"),
    "n03085013": ("n03163973", "computer keyboard -> data input device, not keyboard"),
    "n03208556": ("n03959936", "disk -> plate, not circle"),
    "n03445924": ("n03446832", "golfcart -> golf equipment, not motor vehicle"),
    "n03483316": ("n03251766", "hand blower -> dryer, not blower"),
    "n03602883": ("n03163973", "joystick -> data input device, not control"),
    "n03724870": ("n03206718", "mask -> disguise (a kind of clothing), not covering"),
    "n03770679": ("n02958343", "minivan -> car, not passenger van"),
    "n03773504": ("n04565375", "missile -> weapon, not rocket"),
    "n03876231": ("n02908217", "paintbrush -> brush, not applicator"),
    "n03982430": ("n03414162", "pool table -> game equipment, not table"),
    "n03995372": ("n03997484", "power drill -> power tool, not drill"),
    "n03997484": ("n03699975", "power tool -> machine, not tool"),
    "n04004767": ("n03916720", "printer (machine) -> peripheral, not printer"),
    "n04125853": ("n02827606", "safety belt -> belt, not restraint"),
    "n04179913": ("n03528263", "sewing machine -> home appliance, not textile machine"),
    "n04371774": ("n03964744", "swing -> plaything, not mechanical device"),
    "n04552348": ("n03764276", "warplane -> military vehicle, not heavier-than-air craft"),
    "n07679356": ("n07622061", "bread -> baked goods, not starches"),
    "n07705931": ("n07705711", "edible fruit -> produce, not fruit"),
    "n07710616": ("n07566863", "potato -> starches, not root or solanaceous vegetable"),
    "n07739125": ("n13138842", "apple -> pome, not edible fruit"),
    "n07871810": ("n07557434", "meat loaf -> dish, not loaf of bread"),
}

DOG, HUNTING_DOG, TOY_DOG = "n02084071", "n02087122", "n02085374"
FOX, WILD_DOG, WOLF, FELINE, BEAR = "n02118333", "n02115335", "n02114100", "n02120997", "n02131653"
MUSTELINE, UNGULATE, PRIMATE = "n02441326", "n02370806", "n02469914"
FOOD, MOTOR_VEHICLE, DEVICE = "n07555863", "n03791235", "n03183080"
MIXED_13 = [DOG, "n01503061", "n02159955", "n03405725", "n02512053", "n02484322", "n02958343",
            FELINE, "n04490091", "n13134947", "n12992868", "n02858304", "n03082979"]  # fmt: skip
P3_UNKNOWN = ["n01661091", "n03051540", UNGULATE, "n07707451", "n02686568"]
P1_NEGATIVE = [FOX, WILD_DOG, WOLF, FELINE, BEAR, MUSTELINE, UNGULATE, PRIMATE]
P2_UNKNOWN = [TOY_DOG, FOX, WILD_DOG, WOLF, FELINE, BEAR, MUSTELINE, UNGULATE]
ROOTS = {DOG, HUNTING_DOG, FOOD, MOTOR_VEHICLE, DEVICE, *P1_NEGATIVE, *P2_UNKNOWN, *MIXED_13, *P3_UNKNOWN}

#: (known, negative, unknown) class counts of the protocol lists published with the original code
PUBLISHED_COUNTS = {"p1": (116, 67, 166), "p2": (30, 31, 55), "p3": (151, 97, 164)}


def read_hypernyms(wordnet_dir: Path) -> dict[str, list[str]]:
    """wnid -> its noun hypernyms (``@`` and instance ``@i`` pointers) in file order."""
    path = Path(wordnet_dir) / "data.noun"
    if not path.is_file():
        sys.exit(f"error: {path} not found; install WordNet 3.0 (apt-get install wordnet-base) or pass --wordnet")
    out = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" "):  # the licence header
                continue
            fields = line.split()
            i = 4 + 2 * int(fields[3], 16)  # offset, lex file, pos, word count, words with lex ids
            parents = []
            for _ in range(int(fields[i])):
                symbol, offset, pos = fields[i + 1 : i + 4]
                if symbol in ("@", "@i") and pos == "n":
                    parents.append("n" + offset)
                i += 4
            out["n" + fields[0]] = parents
    return out


def default_synsets() -> Path | None:
    """timm's list of the ImageNet-1K wnids, found without importing timm."""
    spec = find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / "imagenet_synsets.txt"


class Hierarchy:
    """The protocols' ImageNet tree: one parent per synset."""

    def __init__(self, hypernyms: dict[str, list[str]], classes: list[str]):
        self.hypernyms = hypernyms
        self.classes = classes
        missing = [w for w in classes if w not in hypernyms]
        if missing:
            sys.exit(f"error: {len(missing)} ImageNet ids (e.g. {missing[0]}) are not WordNet 3.0 nouns")
        for child, (parent, _) in PARENT.items():
            if parent not in hypernyms.get(child, []):
                sys.exit(f"error: {parent} is no hypernym of {child} in this WordNet; use WordNet 3.0")
        self._roots_above: dict[str, frozenset[str]] = {}
        for w in classes:
            self._check_chain(w)

    def parent(self, wnid: str) -> str | None:
        if wnid in PARENT:
            return PARENT[wnid][0]
        parents = self.hypernyms[wnid]
        return parents[0] if parents else None

    def roots_above(self, wnid: str) -> frozenset[str]:
        """The protocol superclasses on the chain from ``wnid`` up (itself included)."""
        if wnid not in self._roots_above:
            parent = self.parent(wnid)
            above = self.roots_above(parent) if parent else frozenset()
            self._roots_above[wnid] = above | ({wnid} & ROOTS)
        return self._roots_above[wnid]

    def _check_chain(self, wnid: str) -> None:
        """Stop when a synset outside ``PARENT`` has hypernyms leading to different superclasses."""
        node = wnid
        while node is not None:
            options = self.hypernyms[node]
            if node not in PARENT and len({self.roots_above(p) for p in options}) > 1:
                sys.exit(
                    f"error: {node} (above ImageNet class {wnid}) has hypernyms {options} that lead to "
                    f"different protocol superclasses; add it to PARENT"
                )
            node = self.parent(node)

    def below(self, root: str) -> list[str]:
        """ImageNet classes under ``root`` (not ``root`` itself), in wnid = label order."""
        return sorted(w for w in self.classes if w != root and root in self.roots_above(w))


def protocols(tree: Hierarchy) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """protocol -> (known, negative, unknown) wnids, each sorted."""

    def union(roots):
        return sorted({w for r in roots for w in tree.below(r)})

    hunting = tree.below(HUNTING_DOG)
    half = len(hunting) // 2
    known3, negative3, unknown3 = set(), set(), set(union(P3_UNKNOWN))
    for root in MIXED_13:
        for i, w in enumerate(tree.below(root)):
            (known3 if i % 2 == 0 else unknown3 if i % 3 == 0 else negative3).add(w)
    out = {
        "p1": (tree.below(DOG), union(P1_NEGATIVE), union([FOOD, MOTOR_VEHICLE, DEVICE])),
        "p2": (hunting[:half], hunting[half:], union(P2_UNKNOWN)),
        "p3": (sorted(known3), sorted(negative3), sorted(unknown3)),
    }
    for name, (known, negative, unknown) in out.items():
        clash = (set(known) & set(unknown)) | (set(known) & set(negative)) | (set(negative) & set(unknown))
        if clash:
            sys.exit(f"error: {name} puts {sorted(clash)} in two roles")
    return out


def label_spec(labels: list[int]) -> str:
    """[1, 2, 3, 7] -> ``1-3,7``: the LABELS of a ``classes:`` source."""
    parts, start = [], None
    for i, label in enumerate(labels):
        if start is None:
            start = label
        if i + 1 == len(labels) or labels[i + 1] != label + 1:
            parts.append(str(start) if start == label else f"{start}-{label}")
            start = None
    return ",".join(parts)


DESCRIPTIONS = {
    "p1": (
        "NegPrompt's Split-1 (Li et al., CVPR 2024, Table 1): protocol P1 of Palechor, Bhoumik and Günther, "
        "'Large-scale open-set classification protocols for ImageNet' (WACV 2023). ID = the {k} known classes, all "
        "dogs (WordNet 'dog'); OOD = the {u} unknown classes, all non-animals (food, motor vehicles, devices). The "
        "protocol's {n} negative classes (other carnivores, ungulates, primates) are not used, as in NegPrompt."
    ),
    "p2": (
        "NegPrompt's Split-2 (Li et al., CVPR 2024, Table 1): protocol P2 of Palechor, Bhoumik and Günther, "
        "'Large-scale open-set classification protocols for ImageNet' (WACV 2023). ID = the {k} known classes, the "
        "first half of the hunting dogs (wnid order); OOD = the {u} unknown classes, other four-legged animals (toy "
        "dogs, foxes, wild dogs, wolves, felines, bears, mustelines, ungulates). The protocol's {n} negative classes "
        "(the other half of the hunting dogs) are not used, as in NegPrompt."
    ),
    "p3": (
        "NegPrompt's Split-3 (Li et al., CVPR 2024, Table 1): protocol P3 of Palechor, Bhoumik and Günther, "
        "'Large-scale open-set classification protocols for ImageNet' (WACV 2023). ID = the {k} known classes and "
        "OOD = the {u} unknown classes, both a mix of common classes (dogs, birds, insects, furniture, fish, monkeys, "
        "cars, felines, trucks, fruit, fungi, boats, computers; the unknowns add reptiles, clothing, ungulates, "
        "vegetables, aircraft). The protocol's {n} negative classes are not used, as in NegPrompt."
    ),
}
SOURCE_NOTE = (
    " Folders: " + DATA_ROOT_LAYOUT + "; the OOD split reads the unknown classes from imagenet/val. "
    "Class lists rebuilt from WordNet 3.0 by oodcli.data.imagenet_protocols."
)


def benchmark(
    name: str, description: str, id_labels: list[int], ood_labels: list[int], ood_split: str, names: list[str]
) -> dict:
    """One benchmark document: ID classes from imagenet/train and imagenet/val, OOD from imagenet/val."""
    id_spec, ood_spec = label_spec(id_labels), label_spec(ood_labels)
    contiguous = id_spec.count(",") == 0 and "-" in id_spec
    prompt = (
        {"file": PROMPT_FILE, "rows": [id_labels[0], id_labels[-1] + 1]}
        if contiguous
        else {"file": PROMPT_FILE, "indices": id_labels}
    )
    return {
        "name": name,
        "num_classes": len(id_labels),
        "description": description,
        "class_names": [names[i] for i in id_labels],
        "prompt_names": prompt,
        "splits": [
            {"name": "train", "role": "id", "source": f"classes:{id_spec}:folder:imagenet/train"},
            {"name": "test", "role": "id", "source": f"classes:{id_spec}:folder:imagenet/val"},
            {"name": ood_split, "role": "ood-near", "source": f"classes:{ood_spec}:folder:imagenet/val"},
        ],
    }


def dump(doc: dict) -> str:
    """The layout of the other benchmark files: one line per key, splits spelled out."""
    lines = []
    for key, value in doc.items():
        if key == "splits":
            body = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        else:
            body = json.dumps(value, ensure_ascii=False)
        lines.append(f"  {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def build(wordnet_dir: Path, synsets: Path) -> tuple[dict[str, dict], dict[str, tuple[int, int, int]]]:
    """The four benchmark documents and the (known, negative, unknown) counts of P1-P3."""
    classes = [ln.strip() for ln in Path(synsets).read_text().splitlines() if ln.strip()]
    if len(classes) != 1000 or classes != sorted(classes):
        sys.exit(f"error: {synsets} must list the 1000 ImageNet-1K wnids in label (sorted) order")
    names = json.loads((BENCHMARK_DIR / "imagenet.json").read_text())["class_names"]
    label = {w: i for i, w in enumerate(classes)}
    tree = Hierarchy(read_hypernyms(wordnet_dir), classes)
    docs, counts = {}, {}
    for key, (known, negative, unknown) in protocols(tree).items():
        counts[key] = (len(known), len(negative), len(unknown))
        text = DESCRIPTIONS[key].format(k=len(known), n=len(negative), u=len(unknown)) + SOURCE_NOTE
        id_labels, ood_labels = [label[w] for w in known], [label[w] for w in unknown]
        docs[f"imagenet-{key}"] = benchmark(
            f"imagenet-{key}", text, id_labels, ood_labels, f"ood/near/{key}-unknown", names
        )
    docs["imagenet-split4"] = benchmark(
        "imagenet-split4",
        "NegPrompt's Split-4 (Li et al., CVPR 2024, sec. 4.1): ID = the first 100 ImageNet-1K classes (labels 0-99), "
        "OOD = the other 900 (labels 100-999). Folders: " + DATA_ROOT_LAYOUT + "; the OOD split reads classes "
        "100-999 from imagenet/val.",
        list(range(100)),
        list(range(100, 1000)),
        "ood/near/split4-unknown",
        names,
    )
    return docs, counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m oodcli.data.imagenet_protocols", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0 dict folder (with data.noun)"
    )
    parser.add_argument("--out", type=Path, default=BENCHMARK_DIR, help="where the benchmark JSON files go")
    parser.add_argument(
        "--synsets", type=Path, default=None, help="ImageNet-1K wnids in label order (default: timm's list)"
    )
    args = parser.parse_args(argv)
    synsets = args.synsets or default_synsets()
    if synsets is None or not synsets.is_file():
        sys.exit("error: no list of ImageNet-1K wnids; pass --synsets FILE (or install timm)")
    docs, counts = build(args.wordnet, synsets)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        (args.out / f"{name}.json").write_text(dump(doc))
    print(f"{'protocol':10} {'known':>6} {'negative':>9} {'unknown':>8}   published (known/negative/unknown)")
    for key, got in counts.items():
        want = PUBLISHED_COUNTS[key]
        verdict = "same" if got == want else "DIFFERENT"
        print(f"{key:10} {got[0]:6} {got[1]:9} {got[2]:8}   {'/'.join(map(str, want))} {verdict}")
    print(f"{'split4':10} {100:6} {'-':>9} {900:8}")
    print(f"wrote {', '.join(f'{n}.json' for n in docs)} to {args.out}")


if __name__ == "__main__":
    main()
