"""The transfer report: does an interpreter trained on one kind of diff read diffs made another way?

    transfer.variants   named lists of --set overrides, each making its own diffs (e.g. r1: [diffs.rank=1],
                        r8: [diffs.rank=8], zw_start: [data.trigger=zw_start], full: [diffs.mode=full])
    transfer.rows       interpreters: each trained on the train/val diffs of one variant or of several
    columns             every variant: DIT scored on that variant's test split (closed-set top-1 with its
                        95% interval, exact match and token F1)

Each variant is the grid's params with `transfer.common`, then its own overrides laid over them: the same
topics, questions and seeds, so its diffs differ from another variant's only in what the overrides change
and the columns compare. Its diffs are made by the pipeline's own stage functions (make data, generate
diffs, assemble) into `<paths.data>/transfer/<grid>/<variant>/` under diff ids `<variant>_<prefix><5 digits>`;
a variant whose data settings equal an earlier one's copies that data (ids renamed) instead of making it
again. Interpreters use the grid's interpreter settings. Everything resumes: finished data, shards,
interpreters (`row.json`) and cells (`cell.json`) are found and kept, so a rerun trains nothing done.

Writes `<paths.reports>/transfer/<grid>/`: matrix.json, matrix.md, matrix.png, and rank.png (score by
rank, one line per row) when the variants differ in `diffs.rank`; one folder per row (its dataset,
interpreter and one folder per column with that cell's predictions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import polars as pl

from dit_core.config import ConfigError, Params, _set_dotted, parse_override, params_from_dict
from dit_core.data.assemble import DitDataset
from dit_core.data.schemas import read_validated
from dit_core.io import (atomic_path, compare_record, save_figure_atomic, write_json_atomic, write_parquet_atomic,
                         write_text_atomic)

log = logging.getLogger(__name__)

ROW_FILE, CELL_FILE = "row.json", "cell.json"
CELL_KEYS = ("n", "top1", "top1_ci", "top1_chance", "exact", "exact_ci", "token_f1", "token_f1_ci")
# What a variant's overrides may change: what its diffs are made of and how they are made and kept.
VARIANT_KEYS = ("behaviors", "data.", "news.", "diffs.", "assemble.")
CAPTION = "rows: the variants the interpreter was trained on, columns: the variant of the test diffs."


def variant_params(p: Params, name: str, overrides: list[str]) -> Params:
    """The grid's params with `transfer.common` and then `overrides` laid over them (validated)."""
    tree = p.model_dump(mode="json", exclude={"run"})
    for text in [*p.transfer.common, *overrides]:
        key, value = parse_override(text)
        if not (key == "behaviors" or key.startswith(VARIANT_KEYS[1:])):
            raise ConfigError(f"transfer variant {name!r}: --set {text!r}: a variant's overrides change how its "
                              "diffs are made: keys under data, news, diffs, assemble or behaviors; the "
                              "interpreter and evaluation settings are the grid's own")
        _set_dotted(tree, key, value)
    return params_from_dict(tree, f"transfer variant {name!r}")


def _write_if_changed(df: pl.DataFrame, path: Path) -> None:
    """Rewrite a dataset only when its rows changed: an interpreter checkpoint names its data by the file's
    hash, so an unchanged file keeps resuming."""
    if path.exists() and pl.read_parquet(path).sort("diff_id").equals(df.sort("diff_id")):
        return
    write_parquet_atomic(df, path)


def _copy_data(b, src: Path, src_prefix: str, dst: Path, dst_prefix: str, made_with: dict) -> None:
    """Copy behaviour data made with the same settings under other diff ids (`<src_prefix>...` ->
    `<dst_prefix>...`); the made-with record last, as make-data writes it."""
    from dit_core.stages import MADE_WITH

    dst.mkdir(parents=True, exist_ok=True)
    (dst / MADE_WITH).unlink(missing_ok=True)
    for name in b.data_files:
        if name.endswith(".parquet"):
            df = pl.read_parquet(src / name)
            if "diff_id" in df.columns:
                df = df.with_columns((pl.lit(dst_prefix) + pl.col("diff_id").str.slice(len(src_prefix))).alias("diff_id"))
            write_parquet_atomic(df, dst / name)
        else:
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)
    write_json_atomic(dst / MADE_WITH, made_with)


def build_variant(vp: Params, lm, name: str, root: Path, made: dict[str, list[tuple[Path, str]]]) -> pl.DataFrame:
    """Make (or find) one variant's data, diffs and dataset under `root`; returns its dataset.

    made: behaviour -> (data folder, id prefix) of the variants built before, whose data this one copies
    when it was made with the same settings.
    """
    from dit_core.behaviors import get_behavior
    from dit_core.diffs.generate import generate_diffs
    from dit_core.stages import MADE_WITH, make_behavior_data, run_assemble, write_resolved_params

    stores = []
    for bname in vp.behaviors:
        b = get_behavior(bname)
        folder, prefix = root / "behaviors" / bname, f"{name}_{b.id_prefix}"
        want = b.made_with(vp)
        if compare_record(folder / MADE_WITH, want | {"id_prefix": prefix}) != []:
            for src, src_prefix in made.get(bname, []):
                if compare_record(src / MADE_WITH, want | {"id_prefix": src_prefix}) == [] and all(
                        (src / f).exists() for f in b.data_files):
                    log.info("transfer %s: %s data as in %s (same settings): copied, ids renamed", name, bname, src)
                    _copy_data(b, src, src_prefix, folder, prefix, want | {"id_prefix": prefix})
                    break
        make_behavior_data(vp, b, folder, prefix)  # finds the data made or copied above, else makes it
        made.setdefault(bname, []).append((folder, prefix))
        store = root / "diffs" / bname
        generate_diffs(vp, lm, folder, store)  # finished shards are kept
        stores.append(store)
    run_assemble(vp, stores, out=root / "dataset")
    write_resolved_params(vp, root)
    return read_validated(root / "dataset" / "dataset.parquet", DitDataset)


def diffs_digest(df: pl.DataFrame) -> str:
    """sha256 of the diffs themselves: each one's (id, shard sha256, row in the shard), sorted. Ids alone
    would miss a variant made again with other settings under the same ids."""
    items = sorted(df.select("diff_id", "shard_sha256", "row").iter_rows())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _interpreter_record(p: Params, fit: pl.DataFrame) -> dict:
    return {"train_ids": sorted(fit["diff_id"].to_list()), "train_diffs_sha256": diffs_digest(fit),
            "interpreter": p.interpreter.model_dump()}


def train_row(p: Params, lm, fit: pl.DataFrame, folder: Path, progress: bool) -> bool:
    """Train the row's interpreter on `fit` (train/val rows) into folder/interpreter unless `row.json` says it
    is done; returns whether it trained."""
    from dit_core.interpreter.training import InterpreterRecipe

    record = _interpreter_record(p, fit)
    if compare_record(folder / ROW_FILE, record) == [] and (folder / "interpreter" / "interpreter.json").exists():
        return False
    (folder / ROW_FILE).unlink(missing_ok=True)
    _write_if_changed(fit, folder / "dataset" / "dataset.parquet")
    InterpreterRecipe(p, lm, folder / "dataset", folder / "interpreter", progress=progress).run()
    write_json_atomic(folder / ROW_FILE, record)  # last: the commit point of a finished row
    return True


def score_cell(p: Params, lm, fit: pl.DataFrame, test: pl.DataFrame, interpreter: Path, folder: Path,
               questions: Path | None) -> dict:
    """DIT of `interpreter` on the test rows `test` (its predictions in `folder`), or the recorded cell."""
    from dit_core.evaluation.evaluate import evaluate

    spec = json.loads((interpreter / "interpreter.json").read_text())
    record = {"test_ids": sorted(test["diff_id"].to_list()), "test_diffs_sha256": diffs_digest(test),
              "interpreter": spec.get("weights_sha256"),
              "eval": p.eval.model_dump(exclude={"methods", "judge"})}
    done = folder / CELL_FILE
    if done.is_file():
        recorded = json.loads(done.read_text())
        if recorded.get("made_with") == json.loads(json.dumps(record)):
            return recorded["cell"]
    ds = pl.concat([fit, test], how="diagonal_relaxed").sort("diff_id")
    _write_if_changed(ds, folder / "dataset" / "dataset.parquet")
    dit = evaluate(p, lm, folder / "dataset", interpreter, questions, folder)["dit"]
    cell = {k: dit[k] for k in CELL_KEYS if k in dit}
    write_json_atomic(done, {"made_with": record, "cell": cell})  # last: the commit point of a scored cell
    return cell


def _check_grid(p: Params) -> None:
    cfg = p.transfer
    names = [v.name for v in cfg.variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"transfer.variants names {dup} more than once; give each variant its own name")
    rows = [r.name for r in cfg.rows]
    dup = sorted({n for n in rows if rows.count(n) > 1})
    if dup:
        raise ConfigError(f"transfer.rows names {dup} more than once; give each row its own name")
    for r in cfg.rows:
        unknown = [v for v in r.train if v not in names]
        if unknown:
            raise ConfigError(f"transfer.rows {r.name!r} trains on {unknown}, which are not in transfer.variants "
                              f"({names}); name variants of transfer.variants")


def variant_rank(vp: Params) -> int | None:
    """The rank of a variant's stored diffs, or None when they have several (diffs.ranks) or no single one."""
    from dit_core.diffs.generate import stored_rank_scale

    return None if vp.diffs.ranks else stored_rank_scale(vp.diffs)[0]


def transfer(p: Params, lm, data_dir: str | Path, out_dir: str | Path,
             on_cell: Callable[[str, str, dict], None] | None = None, progress: bool = True) -> dict:
    """Build every variant, train every row's interpreter, score every cell (all resumed); returns the matrix."""
    _check_grid(p)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    cfg = p.transfer
    vps = {v.name: variant_params(p, v.name, v.overrides) for v in cfg.variants}
    made: dict[str, list[tuple[Path, str]]] = {}
    datasets, info = {}, {}
    for i, (name, vp) in enumerate(vps.items()):
        log.info("transfer %s: variant %d of %d: %s", name, i + 1, len(vps), cfg.variants[i].overrides)
        ds = build_variant(vp, lm, name, data_dir / name, made)
        datasets[name] = ds
        counts = dict(ds.group_by("split").len().iter_rows())
        info[name] = {"overrides": cfg.variants[i].overrides, "rank": variant_rank(vp), "mode": vp.diffs.mode,
                      **{s: counts.get(s, 0) for s in ("train", "val", "test", "dropped")},
                      "check": check_summary(ds)}
        if counts.get("test", 0) == 0:
            raise ValueError(f"transfer variant {name!r}: no test diff passed the behaviour check "
                             f"({data_dir / name / 'dataset'}); relax assemble.min_trigger_hit / max_*_hit or "
                             "make more diffs")
    behaviors = list(dict.fromkeys(b for vp in vps.values() for b in vp.behaviors))
    p_dit = p.model_copy(update={"behaviors": behaviors, "eval": p.eval.model_copy(update={
        "methods": ["dit"], "judge": p.eval.judge.model_copy(update={"base_url": None})})})
    questions = {n: (data_dir / n / "behaviors" / "hidden_topic" / "questions.parquet") for n in vps}
    matrix: dict[str, dict[str, dict]] = {}
    for row in cfg.rows:
        fit = pl.concat([datasets[v].filter(pl.col("split").is_in(["train", "val"])) for v in row.train])
        if fit.filter(pl.col("split") == "train").height == 0:
            raise ValueError(f"transfer row {row.name!r}: its variants {row.train} have no train diffs")
        folder = out_dir / row.name
        trained = train_row(p_dit, lm, fit, folder, progress)
        log.info("transfer row %s (trained on %s, %d diffs): %s", row.name, row.train,
                 fit.filter(pl.col("split") == "train").height, "trained" if trained else "already trained")
        matrix[row.name] = {}
        for col, ds in datasets.items():
            q = questions[col] if questions[col].exists() else None
            cell = score_cell(p_dit, lm, fit, ds.filter(pl.col("split") == "test"), folder / "interpreter",
                              folder / col, q)
            matrix[row.name][col] = cell
            log.info("transfer %s -> %s: top-1 %.3f %s", row.name, col, cell.get("top1", float("nan")),
                     cell.get("top1_ci"))
            if on_cell:
                on_cell(row.name, col, cell)
    by_rank = rank_columns(info)
    out = {"grid": cfg.grid, "rows": [r.name for r in cfg.rows], "columns": list(vps), "matrix": matrix,
           "row_variants": {r.name: r.train for r in cfg.rows}, "variants": info, "by_rank": by_rank}
    write_json_atomic(out_dir / "matrix.json", out)
    write_text_atomic(out_dir / "matrix.md", transfer_markdown(out))
    from dit_core.evaluation.cross import plot_matrix

    plot_matrix(out, out_dir / "matrix.png", scores=("top1", "exact", "token_f1"))
    if by_rank:
        plot_by_rank(out, out_dir / "rank.png", by_rank)
    return out


CHECK_SUMMARY = ("trigger_hit", "wrong_prefix_hit", "no_trigger_hit", "check_kl", "kept_share")


def check_summary(ds: pl.DataFrame) -> dict[str, float]:
    """Mean behaviour check of a variant's diffs (every split): whether they hold the behaviour at all, and
    how far they move the model (check_kl); a cell on diffs that broke the model says nothing of reading."""
    return {c: round(float(ds[c].mean()), 3) for c in CHECK_SUMMARY
            if c in ds.columns and ds[c].null_count() < ds.height}


def transfer_markdown(m: dict) -> str:
    """The matrix (cross.matrix_markdown) and a table of the variants: overrides, rank, split sizes and the
    mean behaviour check of their diffs."""
    from dit_core.evaluation.cross import matrix_markdown

    lines = [f"# Transfer: {m['grid']}", "", matrix_markdown(m, CAPTION, scores=("exact", "token_f1")).rstrip(), "",
             "| row | trained on |", "|---|---|"]
    lines += [f"| {r} | {', '.join(v)} |" for r, v in m["row_variants"].items()]
    checks = [c for c in CHECK_SUMMARY if any(c in v.get("check", {}) for v in m["variants"].values())]
    lines += ["", "| variant | overrides | rank | train | val | test | dropped |" + "".join(f" {c} |" for c in checks),
              "|---|---|---|---|---|---|---|" + "---|" * len(checks)]
    for name, v in m["variants"].items():
        rank = "mixed" if v["rank"] is None else v["rank"]
        got = v.get("check", {})
        lines.append(f"| {name} | {' '.join(v['overrides']) or '(none)'} | {rank} | {v['train']} | {v['val']} | "
                     f"{v['test']} | {v['dropped']} |" + "".join(
                         f" {got[c]:.3f} |" if c in got else " - |" for c in checks))
    if checks:
        lines += ["", "Behaviour check: each variant's mean over its diffs (kept_share: full finetunes' share of "
                  "the dense change their stored factors keep)."]
    if m["by_rank"]:
        lines += ["", "Score by rank: rank.png (closed-set top-1 with its 95% interval, one line per row)."]
    return "\n".join(lines) + "\n"


def rank_columns(info: dict[str, dict]) -> list[str]:
    """The columns rank.png plots: the LoRA variants, when there are two or more and each has its own single
    rank (other modes' columns, e.g. full finetunes or peft-made adapters, appear in the matrix only)."""
    cols = [n for n, v in info.items() if v.get("mode", "lora") == "lora"]
    ranks = [info[n]["rank"] for n in cols]
    return cols if len(cols) >= 2 and None not in ranks and len(set(ranks)) == len(ranks) else []


def plot_by_rank(m: dict, path: str | Path, columns: list[str] | None = None) -> None:
    """Closed-set top-1 (95% CI) against the test diffs' rank, one line per row; log2 x. `columns`: the
    rank columns (default: every column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = sorted(columns or m["columns"], key=lambda c: m["variants"][c]["rank"])
    x = [m["variants"][c]["rank"] for c in cols]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in m["rows"]:
        cells = [m["matrix"][row][c] for c in cols]
        y = [c["top1"] for c in cells]
        lo = [c["top1"] - c.get("top1_ci", [c["top1"]] * 2)[0] for c in cells]
        hi = [c.get("top1_ci", [c["top1"]] * 2)[1] - c["top1"] for c in cells]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=f"trained on {row}")
    chance = m["matrix"][m["rows"][0]][cols[0]].get("top1_chance")
    if chance is not None:
        ax.axhline(chance, ls="--", c="grey", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(r) for r in x])
    ax.set_xlabel("rank of the test diffs")
    ax.set_ylabel("DIT closed-set top-1")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
