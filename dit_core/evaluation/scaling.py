"""Data-scaling curve: the held-out DIT score against the number of training diffs.

    points = scaling_curve(p, lm, "data/dit_dataset", "reports/scaling", sizes=[16, 32, 64])

One seeded shuffle orders the train split; the point for size n trains a fresh interpreter on the first
n diffs of that order (so the subsets are nested: each point adds diffs to the one before), validates on
the whole val split and scores the `dit` method on the whole test split. Sizes above the train split
are clipped to it. Each point lives in `<out>/n<size>/` (its dataset, interpreter, predictions and
`point.json`); `point.json` is written last, so a rerun with the same settings skips finished points
and resumes a half-trained interpreter from its epoch checkpoint (changed interpreter settings retrain). The curve is written as scaling.json, scaling.md
and scaling.png in `<out>`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Callable

import polars as pl

from dit_core.data.assemble import DitDataset
from dit_core.config import Params
from dit_core.io import (compare_record, move_aside, save_figure_atomic, write_json_atomic, write_parquet_atomic,
                         write_text_atomic)
from dit_core.modeling.models import LoadedModel
from dit_core.data.schemas import read_validated

log = logging.getLogger(__name__)
POINT_FILE = "point.json"
SCORERS = ("top1", "top5", "mrr", "exact", "contains", "token_f1")


def default_sizes(n_train: int, smallest: int = 8) -> list[int]:
    """Doubling sizes from `smallest` below n_train, then n_train itself: 8, 16, 32, ..., n_train."""
    sizes, n = [], smallest
    while n < n_train:
        sizes.append(n)
        n *= 2
    return sizes + [n_train]


def parse_sizes(text: str, n_train: int) -> list[int]:
    """'16,32,all' -> [16, 32, n_train]: sorted, distinct, clipped to the train split."""
    out = set()
    for part in (s.strip() for s in text.split(",")):
        if not part:
            continue
        if part == "all":
            out.add(n_train)
            continue
        try:
            n = int(part)
        except ValueError:
            raise ValueError(f"scaling size {part!r} is neither a whole number nor 'all' "
                             "(e.g. --sizes 16,32,all)") from None
        if n < 1:
            raise ValueError(f"scaling size {n} must be at least 1 training diff")
        out.add(min(n, n_train))
    if not out:
        raise ValueError(f"no scaling sizes in {text!r}; give e.g. 16,32,all")
    return sorted(out)


def train_order(df: pl.DataFrame, seed: int) -> list[str]:
    """The train split's diff ids in one seeded order; a point of size n uses the first n."""
    ids = sorted(df.filter(pl.col("split") == "train")["diff_id"].to_list())
    random.Random(seed).shuffle(ids)
    return ids


def subset_dataset(df: pl.DataFrame, keep_train: list[str]) -> pl.DataFrame:
    """The dataset with its train split cut to `keep_train`; val and test unchanged."""
    keep = set(keep_train)
    return df.filter((pl.col("split") != "train") | pl.col("diff_id").is_in(keep))


def _write_subset(df: pl.DataFrame, path: Path) -> None:
    # Rewrite only when the content changed: the interpreter's checkpoint names its data by the file's
    # hash, and an unchanged file must keep resuming.
    if path.exists():
        old = pl.read_parquet(path)
        if old.sort("diff_id").equals(df.sort("diff_id")):
            return
        log.warning("%s holds another subset (dataset or seed changed); replacing it", path)
    write_parquet_atomic(df, path)


def _made_with(p: Params) -> dict:
    """What a point depends on besides its training diffs: the interpreter and evaluation settings."""
    return {"interpreter": p.interpreter.model_dump(), "eval": p.eval.model_dump(exclude={"methods", "judge"})}


def _point(p: Params, lm: LoadedModel, ds: pl.DataFrame, order: list[str], n: int, out: Path,
           questions_path: Path, progress: bool) -> dict:
    from dit_core.evaluation.evaluate import evaluate
    from dit_core.interpreter.training import InterpreterRecipe

    t0 = time.time()
    sub = subset_dataset(ds, order[:n])
    _write_subset(sub, out / "dataset" / "dataset.parquet")
    summary = InterpreterRecipe(p, lm, out / "dataset", out / "interpreter", progress=progress).run()
    p_dit = p.model_copy(update={"eval": p.eval.model_copy(update={"methods": ["dit"]})})
    metrics = evaluate(p_dit, lm, out / "dataset", out / "interpreter", questions_path, out)["dit"]
    train = sub.filter(pl.col("split") == "train")
    point = {
        "n_train": train.height,
        "n_train_labels": train["label"].n_unique(),
        "n_test": metrics["n"],
        "epochs": summary["epoch"],
        "best_epoch": summary["best_epoch"],
        "steps": summary["step"],
        "best_val": summary["best_val"],
        "seconds": round(time.time() - t0, 1),
        "train_ids": order[:n],
        "made_with": _made_with(p),
    }
    for s in SCORERS:
        if s in metrics:
            point[s] = metrics[s]
            point[f"{s}_ci"] = metrics.get(f"{s}_ci")
    point["top1_chance"] = metrics.get("top1_chance")
    write_json_atomic(out / POINT_FILE, point)  # last: the commit point of a finished point
    return point


def point_dir(out_dir: str | Path, n_train: int) -> Path:
    """Where the point with n_train training diffs lives: dataset, interpreter, predictions, point.json."""
    return Path(out_dir) / f"n{n_train:05d}"


def scaling_curve(p: Params, lm: LoadedModel, dataset_dir: str | Path, out_dir: str | Path,
                  sizes: list[int] | None, questions_path: str | Path,
                  on_point: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
    """Train and score one interpreter per size; returns the points (ascending n_train)."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    ds = read_validated(dataset_dir / "dataset.parquet", DitDataset)
    order = train_order(ds, p.interpreter.seed)
    if not order:
        raise ValueError(f"{dataset_dir}: no train diffs; rerun assemble with more diffs")
    if ds.filter(pl.col("split") == "test").height == 0:
        raise ValueError(f"{dataset_dir}: the test split is empty; rerun assemble")
    sizes = sorted({min(n, len(order)) for n in (sizes or default_sizes(len(order)))})
    points = []
    for n in sizes:
        out = point_dir(out_dir, n)
        done = out / POINT_FILE
        changed = compare_record(done, {"train_ids": order[:n], "made_with": _made_with(p)})
        if changed == []:
            log.info("scaling point n=%d already done (%s); skipping", n, done)
            points.append(json.loads(done.read_text()))
            continue
        if changed:
            stale = move_aside(out)
            log.warning("%s was made with other %s; moved to %s, redoing it", out, ", ".join(changed), stale)
        log.info("scaling point n=%d of %d training diffs", n, len(order))
        point = _point(p, lm, ds, order, n, out, Path(questions_path), progress)
        log.info("scaling n=%d: dit top-1 %.3f %s, exact %.3f", n, point.get("top1", float("nan")),
                 point.get("top1_ci"), point.get("exact", float("nan")))
        if on_point:
            on_point(point)
        points.append(point)
    write_json_atomic(out_dir / "scaling.json", [public(pt) for pt in points])
    write_text_atomic(out_dir / "scaling.md", scaling_table(points))
    plot_scaling(points, out_dir / "scaling.png")
    return points


def public(point: dict) -> dict:
    """A point without its bookkeeping (train ids, settings): what scaling.json and MLflow get."""
    return {k: v for k, v in point.items() if k not in ("train_ids", "made_with")}


def _ci(pt: dict, key: str) -> str:
    v, ci = pt.get(key), pt.get(f"{key}_ci")
    if v is None:
        return "-"
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.2f}"


def scaling_table(points: list[dict]) -> str:
    """Markdown: one row per training-set size."""
    lines = ["| training diffs | labels seen | DIT top-1 [95% CI] | MRR | exact | contains | epochs (best) | n test |",
             "|---|---|---|---|---|---|---|---|"]
    for pt in points:
        lines.append(f"| {pt['n_train']} | {pt['n_train_labels']} | {_ci(pt, 'top1')} | {_ci(pt, 'mrr')} | "
                     f"{_ci(pt, 'exact')} | {_ci(pt, 'contains')} | {pt['epochs']} ({pt['best_epoch']}) | "
                     f"{pt['n_test']} |")
    if points and points[0].get("top1_chance") is not None:
        lines.append(f"\nClosed-set chance: top-1 {points[0]['top1_chance']:.3f}.")
    return "\n".join(lines) + "\n"


def plot_scaling(points: list[dict], path: str | Path) -> None:
    """Held-out top-1 and exact match (95% CIs) against training diffs, log-scaled x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [pt["n_train"] for pt in points]
    for key, name in (("top1", "closed-set top-1"), ("exact", "exact match")):
        if not all(key in pt for pt in points):
            continue
        y = [pt[key] for pt in points]
        lo = [pt[key] - pt[f"{key}_ci"][0] for pt in points]
        hi = [pt[f"{key}_ci"][1] - pt[key] for pt in points]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=name)
    if points and points[0].get("top1_chance") is not None:
        ax.axhline(points[0]["top1_chance"], ls="--", c="grey", label="top-1 chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training diffs")
    ax.set_ylabel("held-out score")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
