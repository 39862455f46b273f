"""The assemble stage: diff manifests -> one train/val/test split for interpreter training.

split_by: topic  the paper's setting: no topic in two splits; the interpreter must name unseen topics
split_by: diff   several diffs per topic; held-out diffs of seen topics (the interpreter must read
                 *this* diff, since another diff of the same topic has a different trigger and seed)
Diffs whose behaviour check failed (trigger not learned, or leaking) are dropped and counted.

With a fixed test store (scheduled retraining's benchmark) the split is made differently: that store's
diffs are the whole test split, and the other stores give train/val only, each split on its own in the
order given, so adding a store never moves an earlier store's diffs to another split.
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


def _train_val(keys: list[str], val_fraction: float, seed: str) -> dict[str, str]:
    keys = sorted(keys)
    random.Random(seed).shuffle(keys)
    n_val = min(round(len(keys) * val_fraction), len(keys) - 1) if len(keys) > 1 else 0
    return {k: "val" if i < n_val else "train" for i, k in enumerate(keys)}


def _fixed_test_split(keep: pl.DataFrame, diff_dirs: list[str | Path], test_dir: str | Path,
                      cfg: AssembleConfig) -> dict[str, str]:
    """diff_id -> split: the test store's kept diffs are the test split; every other store is split
    into train/val on its own (seeded by its name), so its assignment depends on nothing added later."""
    test_store = str(Path(test_dir))
    test = keep.filter(pl.col("store") == test_store)
    if test.height == 0:
        raise ValueError(f"{test_store}: none of its diffs passed the behaviour check, so the test split "
                         "would be empty; relax assemble.min_trigger_hit / max_*_hit or remake that store")
    train = keep.filter(pl.col("store") != test_store)
    test_topics = set(test["label"].str.to_lowercase())
    seen = sorted(set(train.filter(pl.col("label").str.to_lowercase().is_in(test_topics))["label"]))
    if seen:
        raise ValueError(f"topics of the test store {test_store} also appear in training stores: {seen[:5]}; "
                         "its topics must be unseen: make training stores from a topic list without them")
    split = {d: "test" for d in test["diff_id"]}
    topic_split: dict[str, str] = {}
    for d in diff_dirs:
        name = Path(d).name
        group = train.filter(pl.col("store") == str(Path(d)))
        if cfg.split_by == "topic":  # a topic keeps the split of the first store it appeared in
            new = sorted(set(group["label"]) - set(topic_split))
            topic_split |= _train_val(new, cfg.val_fraction, f"{cfg.seed}:{name}")
            split |= {i: topic_split[lab] for i, lab in zip(group["diff_id"], group["label"])}
        else:
            for (label,), g in sorted(group.partition_by("label", as_dict=True).items()):
                split |= _train_val(g["diff_id"].to_list(), cfg.val_fraction, f"{cfg.seed}:{name}:{label}")
    if "train" not in split.values():
        raise ValueError(f"no diff of {[str(d) for d in diff_dirs]} passed the behaviour check: no train split")
    return split


def assemble(diff_dirs: list[str | Path], out_dir: str | Path, cfg: AssembleConfig,
             test_dir: str | Path | None = None) -> dict:
    """Join manifests, drop diffs that failed their behaviour check, split; returns the report.

    test_dir: a fixed test store (see the module docstring); `assemble.test_fraction` is then unused.
    """
    frames = []
    for d in [*diff_dirs, *([test_dir] if test_dir is not None else [])]:
        m = read_validated(Path(d) / "manifest.parquet", DiffManifest)
        frames.append(m.with_columns(store=pl.lit(str(Path(d)))))
    df = pl.concat(frames)
    dup = df.filter(pl.col("diff_id").is_duplicated())["diff_id"].unique().to_list()
    if dup:
        raise ValueError(f"diff ids appear in more than one manifest: {dup[:5]}; give each run its own ids")
    keep = df.filter(_passes(df, cfg))
    dropped = df.filter(~_passes(df, cfg)).with_columns(split=pl.lit("dropped"))
    if test_dir is not None:
        split = _fixed_test_split(keep, diff_dirs, test_dir, cfg)
    elif cfg.split_by == "topic":
        split = _assign(keep["label"].unique().to_list(), cfg)
    else:  # stratified: each topic's diffs are split on their own, so test topics are seen in training;
        # diffs whose label no other diff shares (a news story) are split together
        split, single = {}, []
        for (label,), group in sorted(keep.partition_by("label", as_dict=True).items()):
            ids = group["diff_id"].to_list()
            if len(ids) > 1:
                split |= _assign(ids, cfg)
            else:
                single += ids
        if len(single) > 1:
            split |= _assign(single, cfg)
        elif single:
            split[single[0]] = "train"
        if "test" not in split.values():
            raise ValueError("no topic has two or more kept diffs: split_by=diff needs data.diffs_per_topic >= 2")
    key = "label" if cfg.split_by == "topic" and test_dir is None else "diff_id"
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
    if test_dir is not None:
        report["test_store"] = str(Path(test_dir))
    write_json_atomic(Path(out_dir) / "report.json", report)
    return report
