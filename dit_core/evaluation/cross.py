"""The cross-behaviour matrix: does an interpreter trained on one behaviour read diffs of another?

    rows:     interpreter trained on each behaviour's train split alone, and on all of them (mixture)
    columns:  DIT scored on each behaviour's test split (closed-set top-1 with its 95% interval, token F1)

Every interpreter is trained with the same recipe on the assembled multi-behaviour dataset (its own
behaviours' train and val rows) and asked each behaviour's own question. Writes
reports/cross_behavior/{matrix.json, matrix.md, matrix.png, params.resolved.yaml} and one folder per row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import polars as pl

from dit_core.config import Params
from dit_core.data.assemble import DitDataset
from dit_core.data.schemas import read_validated
from dit_core.io import save_figure_atomic, write_json_atomic, write_parquet_atomic, write_text_atomic

log = logging.getLogger(__name__)
MIXTURE = "mixture"


def training_sets(df: pl.DataFrame, order: list[str]) -> dict[str, pl.DataFrame]:
    """Row name -> the train/val rows its interpreter learns from (each behaviour alone, then all)."""
    names = [b for b in order if b in set(df["behavior"])]
    fit = df.filter(pl.col("split").is_in(["train", "val"]))
    sets = {b: fit.filter(pl.col("behavior") == b) for b in names}
    sets[MIXTURE] = fit
    return sets


def cross_behavior(p: Params, lm, dataset_dir: str | Path, out_dir: str | Path, questions_path: Path,
                   on_cell: Callable[[str, str, dict], None] | None = None, progress: bool = True) -> dict:
    """Train the matrix's interpreters (resuming each), evaluate DIT on every behaviour; returns the matrix."""
    from dit_core.evaluation.evaluate import evaluate
    from dit_core.interpreter.training import InterpreterRecipe

    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    df = read_validated(dataset_dir / "dataset.parquet", DitDataset)
    tested = [b for b in p.behaviors if b in set(df.filter(pl.col("split") == "test")["behavior"])]
    if len(tested) < 2:
        raise ValueError(f"{dataset_dir}: the test split holds behaviours {tested}; the matrix needs two or more "
                         "(run `dit run --profile mixture` or set behaviors to several)")
    p_dit = p.model_copy(update={"eval": p.eval.model_copy(update={
        "methods": ["dit"], "judge": p.eval.judge.model_copy(update={"base_url": None})})})
    matrix: dict[str, dict[str, dict]] = {}
    for row, rows in training_sets(df, p.behaviors).items():
        folder = out_dir / row
        # the training rows of this row, plus every test row (evaluation reads the test split from here)
        ds = pl.concat([rows, df.filter(pl.col("split") == "test")]).sort("diff_id")
        write_parquet_atomic(ds, folder / "dataset" / "dataset.parquet")
        log.info("cross-behaviour: interpreter trained on %s (%d diffs)", row, rows.filter(pl.col("split") == "train").height)
        InterpreterRecipe(p_dit, lm, folder / "dataset", folder / "interpreter", progress=progress).run()
        result = evaluate(p_dit, lm, folder / "dataset", folder / "interpreter", questions_path, folder)
        matrix[row] = {}
        for col in tested:
            d = result["by_behavior"][col]["dit"]
            cell = {k: d[k] for k in CELL_KEYS if k in d}
            matrix[row][col] = cell
            if on_cell:
                on_cell(row, col, cell)
    out = {"rows": list(matrix), "columns": tested, "matrix": matrix}
    write_json_atomic(out_dir / "matrix.json", out)
    write_text_atomic(out_dir / "matrix.md", matrix_markdown(out))
    plot_matrix(out, out_dir / "matrix.png")
    return out


# A cell's metrics, in matrix.json and as MLflow metrics cross.<row>.<column>.<key>.
CELL_KEYS = ("n", "top1", "top1_ci", "top1_chance", "answer_top1", "answer_top1_ci", "token_f1", "token_f1_ci")
SCORE_NAMES = {"top1": "closed-set top-1", "answer_top1": "answer top-1", "exact": "exact match",
               "token_f1": "token F1"}
BEHAVIOR_CAPTION = ("rows: the interpreter's training behaviours, columns: the test diffs' behaviour.")


def matrix_markdown(m: dict, caption: str = BEHAVIOR_CAPTION, scores: tuple[str, ...] = ("answer_top1", "token_f1")
                    ) -> str:
    """Rows: trained on; columns: tested on; cells: top-1 [95% CI] / each of `scores` (by default the closed
    set read from the answers, and token F1)."""
    cols = m["columns"]
    head = " / ".join(["DIT closed-set top-1 [95% CI]", *(SCORE_NAMES.get(s, s) for s in scores)])
    lines = [f"{head}; {caption}", "",
             "| trained on | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in m["rows"]:
        cells = []
        for col in cols:
            c = m["matrix"][row][col]
            ci = c.get("top1_ci", [float("nan")] * 2)
            cells.append(" / ".join([f"{c['top1']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]",
                                     *(f"{c.get(s, float('nan')):.2f}" for s in scores)]))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    chance = ", ".join(f"{col} {m['matrix'][m['rows'][0]][col].get('top1_chance', float('nan')):.3f}" for col in cols)
    lines += ["", f"Closed-set top-1 chance: {chance}."]
    return "\n".join(lines) + "\n"


def plot_matrix(m: dict, path: str | Path, scores: tuple[str, ...] = ("top1", "token_f1")) -> None:
    """Heatmaps of each of `scores` (default closed-set top-1 and token F1; rows: trained on, columns: tested
    on). Both by default: the closed set saturates for diffs that learned a text (the diff alone makes its
    own label the likeliest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols = m["rows"], m["columns"]
    fig, axes = plt.subplots(1, len(scores), figsize=((1.8 * len(cols) + 1) * len(scores), 0.8 * len(rows) + 1.8),
                             squeeze=False)
    axes = list(axes[0])
    for ax, key in zip(axes, scores):
        title = SCORE_NAMES.get(key, key)
        vals = np.array([[m["matrix"][r][c].get(key, np.nan) for c in cols] for r in rows])
        im = ax.imshow(vals, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center",
                        color="white" if vals[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0] else [""] * len(rows))
        ax.set_xlabel("tested on")
        ax.set_title(f"DIT {title}")
    axes[0].set_ylabel("interpreter trained on")
    fig.colorbar(im, ax=axes, shrink=0.8)
    save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
