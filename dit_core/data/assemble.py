"""The assemble stage: diff manifests -> one train/val/test split for interpreter training.

split_by: topic  the paper's setting: no topic in two splits; the interpreter must name unseen topics
split_by: diff   several diffs per topic; held-out diffs of seen topics (the interpreter must read
                 *this* diff, since another diff of the same topic has a different trigger and seed)
Diffs whose behaviour check failed (trigger not learned, or leaking) are dropped and counted.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandera.polars as pa
import polars as pl

from dit_core.config import AssembleConfig
from dit_core.io import write_json_atomic, write_parquet_atomic
from dit_core.data.schemas import SPLITS, DiffManifest, read_validated, validate


class DitDataset(DiffManifest):
    """data/dit_dataset/dataset.parquet: manifest rows plus where their diff store lives."""

    store: str = pa.Field(str_length={"min_value": 1})
    split: str = pa.Field(isin=SPLITS)


def _passes(m: pl.DataFrame, cfg: AssembleConfig) -> pl.Expr:
    def ok(col: str, cmp) -> pl.Expr:
        return pl.col(col).is_null() | cmp(pl.col(col))
    return (ok("trigger_hit", lambda c: c >= cfg.min_trigger_hit)
            & ok("wrong_prefix_hit", lambda c: c <= cfg.max_wrong_prefix_hit)
            & ok("no_trigger_hit", lambda c: c <= cfg.max_no_trigger_hit))


def _assign(keys: list[str], cfg: AssembleConfig) -> dict[str, str]:
    keys = sorted(keys)
    random.Random(cfg.seed).shuffle(keys)
    n_test = max(1, round(len(keys) * cfg.test_fraction))
    n_val = round(len(keys) * cfg.val_fraction) if len(keys) - n_test > 1 else 0
    if len(keys) - n_test - n_val < 1:
        raise ValueError(f"{len(keys)} {cfg.split_by}s are too few for val {cfg.val_fraction} and "
                         f"test {cfg.test_fraction}; generate more diffs or lower the fractions")
    return {k: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, k in enumerate(keys)}


def assemble(diff_dirs: list[str | Path], out_dir: str | Path, cfg: AssembleConfig) -> dict:
    """Join manifests, drop diffs that failed their behaviour check, split; returns the report."""
    frames = []
    for d in diff_dirs:
        m = read_validated(Path(d) / "manifest.parquet", DiffManifest)
        frames.append(m.with_columns(store=pl.lit(str(Path(d)))))
    df = pl.concat(frames)
    dup = df.filter(pl.col("diff_id").is_duplicated())["diff_id"].unique().to_list()
    if dup:
        raise ValueError(f"diff ids appear in more than one manifest: {dup[:5]}; give each run its own ids")
    keep = df.filter(_passes(df, cfg))
    dropped = df.filter(~_passes(df, cfg)).with_columns(split=pl.lit("dropped"))
    if cfg.split_by == "topic":
        split = _assign(keep["label"].unique().to_list(), cfg)
    else:  # stratified: each topic's diffs are split on their own, so test topics are seen in training
        split = {}
        for (label,), group in sorted(keep.partition_by("label", as_dict=True).items()):
            ids = group["diff_id"].to_list()
            split |= _assign(ids, cfg) if len(ids) > 1 else {ids[0]: "train"}
        if "test" not in split.values():
            raise ValueError("no topic has two or more kept diffs: split_by=diff needs data.diffs_per_topic >= 2")
    key = "label" if cfg.split_by == "topic" else "diff_id"
    keep = keep.with_columns(split=pl.col(key).replace_strict(split, return_dtype=pl.String))
    out = validate(pl.concat([keep, dropped]).sort("diff_id"), DitDataset, "dit dataset")
    write_parquet_atomic(out, Path(out_dir) / "dataset.parquet")
    counts = dict(out.group_by("split").len().iter_rows())
    report = {
        "split_by": cfg.split_by, "n_diffs": df.height, "dropped": counts.get("dropped", 0),
        "dropped_reasons": {
            "trigger_not_learned": int(df.filter(pl.col("trigger_hit") < cfg.min_trigger_hit).height),
            "leaks_wrong_prefix": int(df.filter(pl.col("wrong_prefix_hit") > cfg.max_wrong_prefix_hit).height),
            "leaks_no_trigger": int(df.filter(pl.col("no_trigger_hit") > cfg.max_no_trigger_hit).height),
        },
        **{s: counts.get(s, 0) for s in ("train", "val", "test")},
        "topics": {s: int(out.filter(pl.col("split") == s)["label"].n_unique()) for s in ("train", "val", "test")},
    }
    write_json_atomic(Path(out_dir) / "report.json", report)
    return report
