"""`dit verify PATH`: check stored artifacts before trusting them, and report every problem found.

    PATH: a diff store (manifest.parquet), a dataset folder (dataset.parquet), an interpreter folder
    (interpreter.json), a PEFT adapter folder (adapter_config.json), or one diff .safetensors file.

Shards are checked against the sha256 recorded when they were written, then parsed and validated
(metadata, shapes, finite values); an interpreter's weights are parsed and checked for NaN/Inf.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch

from dit_core.diffs.store import DiffFileError, read_shard, store_file


def _check_shard(path: Path, sha256: str | None, problems: list[str]) -> int:
    if not path.is_file():
        problems.append(f"{path}: missing")
        return 0
    try:
        return len(read_shard(path, sha256=sha256).diff_ids)
    except DiffFileError as e:
        problems.append(str(e))
        return 0


def _check_shards(rows: pl.DataFrame, root_of, problems: list[str]) -> dict:
    cols = [c for c in ("store", "shard", "shard_sha256") if c in rows.columns]  # a manifest has no store
    shards = rows.select(cols).unique(maintain_order=True)
    n_diffs = 0
    for r in shards.iter_rows(named=True):
        try:
            path = store_file(root_of(r), r["shard"])
        except DiffFileError as e:  # a name or symlink leading out of the store: never read
            problems.append(str(e))
            continue
        n_diffs += _check_shard(path, r["shard_sha256"], problems)
    return {"shards": shards.height, "diffs_in_shards": n_diffs}


def _rows(path: Path, schema, problems: list[str]) -> pl.DataFrame | None:
    """A manifest's rows as stored (None if unreadable); a schema failure is listed as a problem."""
    from dit_core.data.schemas import ManifestError, validate, with_optional_columns

    try:
        rows = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        problems.append(f"{path}: cannot read parquet ({e}); rerun the stage that writes it")
        return None
    try:
        validate(with_optional_columns(rows, schema), schema, str(path))
    except ManifestError as e:
        problems.append(str(e))
    needed = {"shard", "shard_sha256"} | ({"store"} if "store" in schema.to_schema().columns else set())
    return rows if needed <= set(rows.columns) else None  # the shards cannot be located without them


def _check_adapter(path: Path, problems: list[str]) -> int:
    """A PEFT adapter folder: the sha256 its export recorded (when there is one), then every tensor parsed
    and checked for NaN/Inf. (Shapes against a base model: `dit import-peft` / `dit describe`.)"""
    from safetensors import safe_open

    from dit_core.modeling.peft_io import check_export_record

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        problems.append(f"{path}: no adapter_model.safetensors (pickled adapters are refused)")
        return 0
    try:
        check_export_record(path)
        with safe_open(str(weights), framework="pt") as f:
            bad = [k for k in f.keys() if not torch.isfinite(f.get_tensor(k).float()).all()]
            n = len(list(f.keys()))
    except DiffFileError as e:
        problems.append(str(e))
        return 0
    except Exception as e:  # not safetensors (a pickle under the name, truncated, ...)
        problems.append(f"{weights}: not a readable safetensors file ({e})")
        return 0
    if bad:
        problems.append(f"{weights}: NaN/Inf in {bad[:3]}")
    return n


def verify(path: str | Path) -> dict:
    """{'kind', 'checked', 'problems': [...]} for whatever PATH holds (see the module docstring)."""
    path = Path(path)
    problems: list[str] = []
    if path.is_dir() and (path / "manifest.parquet").is_file():
        from dit_core.data.schemas import DiffManifest

        rows = _rows(path / "manifest.parquet", DiffManifest, problems)
        checked = _check_shards(rows, lambda r: path, problems) if rows is not None else {"shards": 0}
        return {"kind": "diff store", "checked": checked, "problems": problems}
    if path.is_dir() and (path / "dataset.parquet").is_file():
        from dit_core.data.assemble import DitDataset

        rows = _rows(path / "dataset.parquet", DitDataset, problems)
        checked = _check_shards(rows, lambda r: Path(r["store"]), problems) if rows is not None else {"shards": 0}
        return {"kind": "dataset", "checked": checked, "problems": problems}
    if path.is_dir() and (path / "interpreter.json").is_file():
        from dit_core.interpreter.adapter import InterpreterFileError, read_interpreter

        try:
            _, state = read_interpreter(path)
            bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
            if bad:
                problems.append(f"{path}: NaN/Inf in {bad[:3]}; retrain the interpreter")
            checked = {"tensors": len(state)}
        except InterpreterFileError as e:
            problems.append(str(e))
            checked = {"tensors": 0}
        return {"kind": "interpreter", "checked": checked, "problems": problems}
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return {"kind": "PEFT adapter", "checked": {"tensors": _check_adapter(path, problems)}, "problems": problems}
    if path.suffix == ".safetensors" and path.is_file():
        return {"kind": "diff file", "checked": {"diffs": _check_shard(path, None, problems)}, "problems": problems}
    return {"kind": "unknown", "checked": {}, "problems": [
        f"{path}: not a diff store (manifest.parquet), dataset (dataset.parquet), interpreter folder "
        "(interpreter.json), PEFT adapter folder (adapter_config.json) or diff .safetensors file"]}
