"""Sources for a user's own data: Hugging Face datasets, WebDataset tar shards, CSV / JSON-lines lists.

``hf:DATASET[:CONFIG]:SPLIT``  a folder written by ``save_to_disk``, a folder of data files (parquet,
                               imagefolder) or a ``.parquet`` / ``.arrow`` file, or a hub name (machines
                               with internet); image and label columns found by feature type
                               (``Image``, ``ClassLabel``), class names from the ClassLabel
``webdataset:PATTERN``         uncompressed tar shards, brace patterns such as ``shards-{000..099}.tar``;
                               a sample is the members sharing a key (``KEY.jpg``, ``KEY.cls``)
``csv:FILE`` / ``jsonl:FILE``  one row per image: a path (relative to the file's folder, else to the data
                               root) and an optional label (integers, or names numbered in sorted order)

Columns are found or named: a spec may end in ``?image=COLUMN&label=COLUMN`` (what ``extract
--image-column`` / ``--label-column`` add), a WebDataset "column" being a member's extension. The
columns actually read are part of the data set's name, hence of its identity and fingerprint.

Nothing here imports ``datasets`` or PIL until a source is opened, and no source imports torch:
the ``webdataset`` package imports torch on import, so shards are indexed with ``tarfile`` (a
cache hit then stays torch-free) and patterns expanded by ``braceexpand``, as webdataset does.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np

from oodcli.data.base import ImageDataset, register_source
from oodcli.data.sources import (
    FIX_HINT,
    _eight_bit,
    _looked,
    _open_image,
    _reason,
    _resolve,
    decode_check,
    image_suffixes,
)
from oodcli.errors import OodError, UsageError

#: the kinds whose specs take ``?image=...&label=...``
COLUMN_KINDS = ("hf", "webdataset", "csv", "jsonl")
_COLUMN_KEYS = {"image": "--image-column", "label": "--label-column"}


# --- columns ------------------------------------------------------------------------------------


def split_columns(spec: str) -> tuple[str, dict[str, str]]:
    """``DIR:train?image=img&label=y`` -> (``DIR:train``, {"image": "img", "label": "y"})."""
    base, mark, query = spec.partition("?")
    columns: dict[str, str] = {}
    for item in query.split("&") if mark else ():
        key, eq, value = item.partition("=")
        if key not in _COLUMN_KEYS or not eq or not value:
            raise UsageError(f"bad column option '{item}' in '{spec}'; write ?image=COLUMN&label=COLUMN")
        columns[key] = value
    return base, columns


def with_columns(spec: str, image: str | None, label: str | None) -> str:
    """The data spec with ``--image-column`` / ``--label-column`` folded in, so the split's recorded
    source reopens the same rows and columns (``predict``, trainers reading the store)."""
    given = {k: v for k, v in (("image", image), ("label", label)) if v}
    if not given:
        return spec
    kind = spec.partition(":")[0]
    if kind not in COLUMN_KINDS:
        raise UsageError(f"{', '.join(_COLUMN_KEYS[k] for k in given)} go with --data "
                         f"{', '.join(k + ':...' for k in COLUMN_KINDS)}, not '{kind}:'")
    base, columns = split_columns(spec)
    for key, value in given.items():
        if columns.get(key, value) != value:
            raise UsageError(f"{_COLUMN_KEYS[key]} {value} disagrees with {key}={columns[key]} in '{spec}'")
    columns |= given
    return base + "?" + "&".join(f"{k}={columns[k]}" for k in _COLUMN_KEYS if k in columns)


def _named(kind: str, arg: str, image: str, label: str | None) -> str:
    """A source's name with the columns it reads (found or named): its identity."""
    return f"{kind}:{arg}?image={image}" + (f"&label={label}" if label else "")


def labels_from_values(values: list, where: str) -> tuple[np.ndarray, list[str] | None]:
    """Labels of a column: integers as they are (-1 = none); anything else read as class names,
    numbered in sorted order (the names returned). Empty values are -1 in both cases."""
    present = [v for v in values if v is not None and str(v).strip() != ""]
    try:
        ints = {v: int(v) for v in {str(v).strip() for v in present}}
    except ValueError:
        ints = None
    if ints is not None or not present:
        labels = [-1 if v is None or str(v).strip() == "" else ints[str(v).strip()] for v in values]
        labels = np.asarray(labels, dtype=np.int64)
        if (labels < -1).any():
            raise OodError(f"{where}: label {int(labels.min())} is negative (-1 marks an unlabelled row)")
        return labels, None
    names = sorted({str(v).strip() for v in present})
    index = {name: i for i, name in enumerate(names)}
    labels = [-1 if v is None or str(v).strip() == "" else index[str(v).strip()] for v in values]
    return np.asarray(labels, dtype=np.int64), names


def _keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _open_bytes(data: bytes, what: str):
    """An image held in memory (a WebDataset member, a dataset cell), read fully."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _eight_bit(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise OodError(f"image {what} cannot be read ({_reason(exc)}); fix or remove it") from None


def _bytes_check(data: bytes | None) -> str | None:
    return "no image bytes" if not data else decode_check(io.BytesIO(data))


def _unlabelled(data: ImageDataset, is_ood: bool) -> ImageDataset:
    if is_ood:
        data.labels, data.class_names = np.full(len(data), -1, np.int64), None
    return data


# --- Hugging Face datasets ----------------------------------------------------------------------

_LOADABLE_FILES = {".parquet": "parquet", ".arrow": "arrow"}


class HFDataset(ImageDataset):
    """One split of a ``datasets.Dataset``: images decoded one row at a time from the image column."""

    def __init__(self, name: str, ds, image: str, labels: np.ndarray, class_names):
        self.name = name
        self.images = ds.select_columns([image])
        self.image = image
        self.labels = labels
        self.class_names = class_names
        self.arrow_fingerprint = ds._fingerprint  # changes with the table's content (datasets' own hash)

    def load(self, i: int):
        img = self.images[int(i)][self.image]
        if img is None:
            raise OodError(f"{self.name}: row {i} has no image")
        return _eight_bit(img)

    def unreadable(self, start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
        from datasets import Image

        stop = len(self) if stop is None else stop
        raw = self.images.select(range(start, stop)).cast_column(self.image, Image(decode=False))
        bad, row = [], start
        for batch in raw.iter(batch_size=256):
            for cell in batch[self.image]:
                cell = cell or {}
                data = cell.get("bytes")
                reason = decode_check(Path(cell["path"])) if data is None and cell.get("path") else _bytes_check(data)
                if reason is not None:
                    bad.append((f"{self.name} row {row}", reason))
                row += 1
        return bad

    def identity(self) -> str:
        return f"{super().identity()}:arrow={self.arrow_fingerprint}"


def _looks_local(name: str) -> bool:
    """Whether a dataset name that is not on disk was meant as a path (hub names are ``NAME`` or
    ``OWNER/NAME``): the error is then 'not found', not a failed hub request."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in _LOADABLE_FILES


def _load_hf(name: str, config: str | None, split: str, root: Path):
    """The ``datasets.Dataset`` of one split, from disk or the hub."""
    import datasets

    path = _resolve(root, name)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        if config:
            raise UsageError(f"hf:{name} is a save_to_disk folder, which has no configs; write hf:{name}:{split}")
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise UsageError(f"hf:{name} has no split '{split}'; use one of: {', '.join(saved)}")
            return saved[split]
        recorded = str(saved.split) if saved.split is not None else "train"
        if split != recorded:
            raise UsageError(f"hf:{name} holds one split, '{recorded}'; write hf:{name}:{recorded}")
        return saved
    quiet = not datasets.are_progress_bars_disabled()
    if quiet:  # progress goes to oodcli's own bar, not one per loading step
        datasets.disable_progress_bars()
    try:
        if path.is_file():
            builder = _LOADABLE_FILES.get(path.suffix)
            if builder is None:
                raise UsageError(f"hf:{name}: read .parquet or .arrow files, or a folder of them or of images")
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        if path.is_dir():
            return datasets.load_dataset(str(path), config, split=split)
        if _looks_local(name):
            raise OodError(f"Hugging Face dataset {name} not found (looked in {_looked(root, name)}); {FIX_HINT}")
        return datasets.load_dataset(name, config, split=split)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _column(features: dict, named: str | None, kind, what: str, flag: str, where: str) -> str | None:
    """The named column (checked), else the one column of feature type ``kind`` (None if none)."""
    if named is not None:
        if named not in features:
            raise UsageError(f"{where} has no column '{named}' ({flag}); its columns: {', '.join(features)}")
        return named
    found = [c for c, f in features.items() if isinstance(f, kind)]
    if len(found) > 1:
        raise UsageError(f"{where} has {len(found)} {what} columns ({', '.join(found)}); name one with {flag}")
    return found[0] if found else None


@register_source("hf")
def hf_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    """``DATASET[:CONFIG]:SPLIT[?image=COL&label=COL]``."""
    base, columns = split_columns(arg)
    parts = base.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"bad source 'hf:{arg}'; write hf:DATASET:SPLIT or hf:DATASET:CONFIG:SPLIT "
                         "(DATASET a save_to_disk folder, data files or a hub name)")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]
    try:
        import datasets
    except ImportError:
        raise OodError("hf: data sources need the 'datasets' package; pip install datasets") from None
    try:
        ds = _load_hf(name, config, split, root)
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetsError) as exc:
        raise OodError(f"cannot open Hugging Face dataset hf:{base} ({_reason(exc)})") from None
    where = f"hf:{base}"
    features = dict(ds.features)
    image = _column(features, columns.get("image"), datasets.Image, "image", "--image-column", where)
    if image is None:
        raise OodError(f"{where} has no image column (columns: "
                       + ", ".join(f"{c}: {f}" for c, f in features.items())
                       + "); cast the images to datasets.Image, or name the column with --image-column")
    if not isinstance(features[image], datasets.Image):
        raise UsageError(f"column '{image}' of {where} holds {features[image]}, not images; "
                         "name an Image column with --image-column")
    label = _column(features, columns.get("label"), datasets.ClassLabel, "ClassLabel", "--label-column", where)
    labels, class_names = np.full(len(ds), -1, np.int64), None
    if label is not None:
        feature = features[label]
        values = ds.select_columns([label]).with_format("numpy")[label]
        if isinstance(feature, datasets.ClassLabel):
            labels, class_names = np.asarray(values, dtype=np.int64), list(feature.names)
        elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint", "string", "large_string")):
            labels, class_names = labels_from_values(list(values), f"column '{label}' of {where}")
        else:
            raise UsageError(f"column '{label}' of {where} holds {feature}; a label column holds a ClassLabel, "
                             "integers or class names")
    data = HFDataset(_named("hf", base, image, label), ds, image, labels, class_names)
    return _unlabelled(data, is_ood)


# --- WebDataset shards --------------------------------------------------------------------------

#: webdataset's split of a member name: the key up to the first dot of the file name, the extension after
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
CLASS_KEYS = ("cls", "label", "class", "target")


class ShardDataset(ImageDataset):
    """Samples of tar shards, indexed once: where each image member lies (shard, byte offset, size),
    so any row is read with one seek; ``keys`` (``SHARD/KEY``) name the rows, stably."""

    def __init__(self, name: str, shards: list[Path], where: np.ndarray, keys: list[str], labels, class_names):
        self.name = name
        self.shards = shards
        self.where = where  # int64 [N, 3]: shard index, data offset, size
        self.keys = keys
        self.labels = labels
        self.class_names = class_names

    def _bytes(self, i: int) -> bytes:
        shard, offset, size = (int(v) for v in self.where[i])
        try:
            with open(self.shards[shard], "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as exc:
            raise OodError(f"shard {self.shards[shard]} cannot be read ({_reason(exc)})") from None
        if len(data) != size:
            raise OodError(f"shard {self.shards[shard]} changed since it was indexed; run again")
        return data

    def load(self, i: int):
        return _open_bytes(self._bytes(i), f"{self.keys[i]} of {self.name}")

    def unreadable(self, start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
        bad = []
        for i in range(start, len(self) if stop is None else stop):
            reason = _bytes_check(self._bytes(i))
            if reason is not None:
                bad.append((self.keys[i], reason))
        return bad

    def identity(self) -> str:
        return f"{super().identity()}:keys={_keys_digest(self.keys)}"


def _index_shard(path: Path, shown: str) -> dict[str, dict[str, tuple[int, int]]]:
    """Samples of one tar in order: key -> {extension: (data offset, size)}."""
    size = path.stat().st_size
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                m = _MEMBER.match(member.name)
                if not member.isfile() or not m or Path(member.name).name.startswith("__"):
                    continue
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"truncated at member {member.name}")
                samples.setdefault(m.group(1), {})[m.group(2)] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise OodError(f"shard {shown} cannot be read as an uncompressed tar ({_reason(exc)}); "
                       "fix or remove it") from None
    return samples


def _pick(members: dict, named: str | None, suffixes, sample: str) -> str:
    """The image member of one sample: the named extension, else its one image-typed member."""
    if named is not None:
        if named not in members:
            raise OodError(f"sample {sample} has no .{named} member (it has {', '.join(members)})")
        return named
    found = [ext for ext in members if "." + ext.rsplit(".", 1)[-1].lower() in suffixes]
    if len(found) != 1:
        what = "no image member" if not found else f"{len(found)} image members ({', '.join(found)})"
        raise OodError(f"sample {sample} has {what}; name the image extension with --image-column")
    return found[0]


@register_source("webdataset")
def webdataset_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    """``PATTERN[?image=EXT&label=EXT]``: shards in the pattern's order, samples in tar order."""
    from braceexpand import braceexpand

    pattern, columns = split_columns(arg)
    names = list(dict.fromkeys(braceexpand(pattern))) if pattern else []
    if not names:
        raise UsageError("webdataset: needs a shard pattern, e.g. webdataset:shards/train-{000..099}.tar")
    shards = []
    for shown in names:
        path = _resolve(root, shown)
        if not path.is_file():
            raise OodError(f"shard {shown} not found (looked in {_looked(root, shown)}); {FIX_HINT}")
        shards.append((shown, path))
    samples = [(s, shown, key, members) for s, (shown, path) in enumerate(shards)
               for key, members in _index_shard(path, shown).items()]
    if not samples:
        raise OodError(f"shards {pattern} hold no samples")
    seen = sorted({ext for *_, members in samples for ext in members})
    for key in ("image", "label"):
        if key in columns and columns[key] not in seen:
            raise UsageError(f"no sample of {pattern} has a .{columns[key]} member ({_COLUMN_KEYS[key]}); "
                             f"extensions found: {', '.join(seen)}")
    label = columns.get("label") or next((k for k in CLASS_KEYS if k in seen), None)
    suffixes = image_suffixes()
    where, keys, values, image_exts = [], [], [], set()
    for s, shown, key, members in samples:
        sample = f"{shown}/{key}"
        ext = _pick(members, columns.get("image"), suffixes, sample)
        image_exts.add(ext)
        where.append((s, *members[ext]))
        keys.append(sample)
        values.append(None if label is None or label not in members else members[label])
    paths = [path for _, path in shards]
    labels, class_names = np.full(len(keys), -1, np.int64), None
    if label is not None:
        texts = []
        for (s, _, key, _m), cell in zip(samples, values):
            if cell is None:
                raise OodError(f"sample {shards[s][0]}/{key} has no .{label} member, unlike others; "
                               "give every sample one or name another --label-column")
            with open(paths[s], "rb") as f:
                f.seek(cell[0])
                texts.append(f.read(cell[1]).decode("utf-8", "replace").strip())
        labels, class_names = labels_from_values(texts, f".{label} of {pattern}")
    image = columns.get("image") or ",".join(sorted(image_exts))
    data = ShardDataset(_named("webdataset", pattern, image, label), paths,
                        np.asarray(where, dtype=np.int64).reshape(-1, 3), keys, labels, class_names)
    return _unlabelled(data, is_ood)


# --- CSV / JSON lines -----------------------------------------------------------------------------

PATH_COLUMNS = ("path", "image", "image_path", "file", "filename", "filepath", "img")
LABEL_COLUMNS = ("label", "class", "target", "y")


class ListDataset(ImageDataset):
    """Images listed in a file; ``keys`` are the paths as listed (the rows' identity, wherever the
    list's folder or the data root lies)."""

    def __init__(self, name: str, files: list[Path], keys: list[str], labels, class_names):
        self.name = name
        self.files = files
        self.keys = keys
        self.labels = labels
        self.class_names = class_names

    def load(self, i: int):
        return _open_image(self.files[i], self.name)

    def unreadable(self, start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
        checked = ((str(path), decode_check(path)) for path in self.files[start:stop])
        return [(path, reason) for path, reason in checked if reason is not None]

    def identity(self) -> str:
        return f"{super().identity()}:keys={_keys_digest(self.keys)}"


def _read_rows(path: Path, lines: bool) -> tuple[list[dict], list[str]]:
    """(rows, columns) of a CSV file with a header, or of JSON lines (one object a line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise OodError(f"image list {path} cannot be read ({_reason(exc)})") from None
    if not lines:
        reader = csv.DictReader(io.StringIO(text))
        return list(reader), list(reader.fieldnames or [])
    rows, columns = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise OodError(f"{path} line {n} is not JSON ({_reason(exc)})") from None
        if not isinstance(row, dict):
            raise OodError(f"{path} line {n} is not a JSON object with a path field")
        rows.append(row)
        columns |= dict.fromkeys(row)
    return rows, list(columns)


def _list_column(columns: list[str], named: str | None, defaults, flag: str, where: str) -> str | None:
    if named is not None:
        if named not in columns:
            raise UsageError(f"{where} has no column '{named}' ({flag}); its columns: {', '.join(columns)}")
        return named
    lower = {c.lower(): c for c in columns}
    return next((lower[d] for d in defaults if d in lower), None)


def _list_source(kind: str, arg: str, root: Path, is_ood: bool) -> ImageDataset:
    file, columns = split_columns(arg)
    if not file:
        raise UsageError(f"{kind}: needs a file, e.g. {kind}:lists/images.{kind}")
    path = _resolve(root, file)
    if not path.is_file():
        raise OodError(f"image list {file} not found (looked in {_looked(root, file)}); {FIX_HINT}")
    lines = kind == "jsonl" or path.suffix.lower() in (".jsonl", ".ndjson")
    rows, names = _read_rows(path, lines)
    where = f"{kind}:{file}"
    if not rows:
        raise OodError(f"{where} lists no images")
    image = _list_column(names, columns.get("image"), PATH_COLUMNS, "--image-column", where)
    if image is None:
        raise OodError(f"{where} has no path column (columns: {', '.join(names)}); "
                       f"call it {' or '.join(PATH_COLUMNS[:2])} or name it with --image-column")
    label = _list_column(names, columns.get("label"), LABEL_COLUMNS, "--label-column", where)
    keys = []
    for n, row in enumerate(rows, 1):
        value = row.get(image)
        if not isinstance(value, str) or not value.strip():
            raise OodError(f"{where}: row {n} has no path in column '{image}'")
        keys.append(value.strip())
    base = _list_base(path.parent, root, keys)
    files = [p if p.is_absolute() else base / p for p in map(lambda k: Path(k).expanduser(), keys)]
    labels, class_names = np.full(len(keys), -1, np.int64), None
    if label is not None:
        labels, class_names = labels_from_values([row.get(label) for row in rows], f"column '{label}' of {where}")
    data = ListDataset(_named(kind, file, image, label), files, keys, labels, class_names)
    return _unlabelled(data, is_ood)


def _list_base(beside: Path, root: Path, keys: list[str]) -> Path:
    """Where relative paths start: the list's own folder, unless none of the first few listed
    images is there and some is under the data root. Images missing from the chosen base are
    refused by name before extraction writes anything (``ImageDataset.unreadable``)."""
    relative = [k for k in keys[:8] if not Path(k).expanduser().is_absolute()]
    if any((beside / k).exists() for k in relative) or not any((root / k).exists() for k in relative):
        return beside
    return root


@register_source("csv")
def csv_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    """``FILE[?image=COL&label=COL]``: a CSV file with a header (a ``.jsonl`` file is read as JSON lines)."""
    return _list_source("csv", arg, root, is_ood)


@register_source("jsonl")
def jsonl_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    """``FILE[?image=COL&label=COL]``: JSON lines, one object per image with the same fields as a CSV row."""
    return _list_source("jsonl", arg, root, is_ood)
