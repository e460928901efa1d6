"""``oodcli threshold`` and ``oodcli predict``: from a benchmark table to a decision on new images."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

import typer

from oodcli.cli.common import STATE, err, out
from oodcli.errors import OodError, UsageError


def threshold(
    method: str = typer.Argument(..., help="A scored method (a name under scores/, --as names included)."),
    store: Path = typer.Option(..., "--store", "-s", help="Store with the method's scores."),
    split: Optional[str] = typer.Option(
        None, "--split", help="ID split whose scores set it (default: the validation split 'val'; the test split "
        "only if named, which makes the test metrics at the threshold optimistic)."
    ),
    tpr: float = typer.Option(0.95, "--tpr", help="Share of the split's ID images kept (score >= threshold)."),
    id_split: Optional[str] = typer.Option(None, "--id", help="ID test split whose scores the threshold must match (default: test)."),
    as_json: bool = typer.Option(False, "--json", help="Print the recorded threshold as JSON."),
) -> None:
    """Set the decision threshold of a method: the score at which --tpr of an ID split is kept.

    Recorded under fitted/thresholds/METHOD with the split's fingerprint and what made the
    scores (method, backbone, weights, hyperparameters); 'report' then shows the TPR and each
    OOD set's FPR at it, and 'predict' decides in / out with it. Reads stored scores only
    (no model is built); the split needs scores made with the same settings as the test
    split's, and the error says the command that makes them.

    Examples:

      oodcli score knn --store stores/digits.zarr --id val --backbone digits_cnn

      oodcli threshold knn --store stores/digits.zarr

      oodcli threshold knn --store stores/digits.zarr --tpr 0.99 --json
    """
    from oodcli.deploy import record_threshold

    result = record_threshold(store, method, split=split, tpr=tpr, id_split=id_split)
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    out.print(f"{method}: threshold {result.value:.6g} keeps {100 * result.kept:.1f}% of '{result.split}' "
              f"({result.rows} rows, asked {100 * result.tpr:g}%); recorded as fitted/thresholds/{method}", markup=False)


OUT_FORMATS = (".jsonl", ".json", ".csv")
CSV_FIELDS = ("id", "score", "decision", "percentile", "class", "probability")


def predict(
    method: str = typer.Argument(..., help="A scored method of the store (its settings and fitted state are used)."),
    store: Path = typer.Option(..., "--store", "-s", help="Store the method was scored in."),
    data: str = typer.Option(..., "--data", "-d", help="New images: a folder, or a data source (folder:DIR, digits:test, ...)."),
    threshold_opt: str = typer.Option(
        "recorded", "--threshold", help="'recorded' (from 'oodcli threshold'), a number, or 'none' (scores only)."
    ),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Write FILE.jsonl or FILE.csv instead of JSON lines on stdout."),
    id_split: Optional[str] = typer.Option(None, "--id", help="ID test split whose scores define the method (default: test)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    split: Optional[str] = typer.Option(
        None, "--split", help="Also add the images to the store as split NAME (an ordinary extract + score of the "
        "method; the role follows the name, e.g. ood/far/new, or --role)."
    ),
    role: Optional[str] = typer.Option(None, "--role", help="Role of the --split (default: from its name)."),
) -> None:
    """Score new images with a store's method and decide, per image, in- or out-of-distribution.

    Rebuilds the backbone the store records for the method (the same weights, checked by
    their hash, and preprocessing), runs it over the images in batches and scores them with
    the method's fitted state; nothing is added to the store unless --split NAME asks for
    it (then it is an ordinary extract + score). One record per image: id
    (its path), score, decision (in: score >= threshold), percentile among the threshold
    split's ID scores, and the predicted class and its probability where the backbone has a
    head. Unreadable images are listed on stderr, the others predicted, and the exit code
    is then 1.

    Examples:

      oodcli threshold knn --store stores/digits.zarr

      oodcli predict knn --store stores/digits.zarr --data digits:ood/near/digits6-9 | head -3

      oodcli predict knn --store stores/digits.zarr --data my_images/ --out decisions.csv
    """
    from oodcli.deploy import Detector, open_images
    from oodcli.outputs import atomic_write, check_output_file

    threshold_value = None if threshold_opt == "none" else threshold_opt
    if out_path is not None:
        if out_path.suffix not in OUT_FORMATS:
            raise UsageError(f"--out {out_path}: use a .jsonl or .csv file")
        check_output_file(out_path)
    images = open_images(data)  # a missing or empty folder is refused before the model is built
    detector = Detector.from_store(store, method, threshold=threshold_value, id_split=id_split, device=device,
                                   batch_size=batch_size)
    from oodcli.cli.common import _progress

    bar = _progress()
    task = bar.add_task(f"predict {method}", total=len(images))
    lines: list[dict] = []

    def emit(part) -> None:
        rows = list(part.rows())
        if out_path is None:
            for row in rows:
                out.print(json.dumps(row), markup=False, highlight=False, soft_wrap=True)
        else:
            lines.extend(rows)
        bar.advance(task, len(rows))

    with bar:
        result = detector.predict_batches(images, collect=False, on_batch=emit)
    if out_path is not None:
        atomic_write(out_path, lambda tmp: tmp.write_text(_render(lines, out_path.suffix)))
        if not STATE["quiet"]:
            err.print(f"wrote {len(lines)} predictions to {out_path}", markup=False)
    if split is not None and not result.failed:
        from oodcli.deploy import add_to_store

        add_to_store(store, method, data, split, role=role, id_split=id_split, device=device, batch_size=batch_size)
        if not STATE["quiet"]:
            err.print(f"added the images as split '{split}' with '{method}' scores", markup=False)
    if result.failed:
        for name, why in result.failed:
            err.print(f"unreadable: {name} ({why})", markup=False)
        raise OodError(f"{len(result.failed)} of {len(images)} images could not be read (listed above); "
                       "the others were predicted")


def _render(rows: list[dict], suffix: str) -> str:
    if suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[f for f in CSV_FIELDS if any(f in r for r in rows)] or ["id"])
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    return "".join(json.dumps(row) + "\n" for row in rows)
