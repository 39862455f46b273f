"""The transfer report (dit transfer) on the tiny model, and mixed ranks in one store (diffs.ranks)."""

import json
from pathlib import Path

import polars as pl
import pytest
import torch

from conftest import PARAMS, pipeline_overrides, tiny_overrides

GRID = ["transfer.grid=two-ranks", "transfer.common=[]",
        "transfer.variants=[{name: r1, overrides: [diffs.rank=1]}, {name: r4, overrides: [diffs.rank=4]}]",
        "transfer.rows=[{name: r1, train: [r1]}, {name: mixed, train: [r1, r4]}]"]


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {str(f): f.stat().st_mtime_ns for f in sorted(folder.rglob(pattern))}


def test_two_rank_grid_end_to_end_and_a_rerun_trains_nothing(tiny_model_dir, tmp_path, mlflow_uri):
    from dit_core.config import load_params
    from dit_core.stages import transfer_data_dir, transfer_dir
    from tasks.stage_runs import run_stage

    p = load_params(PARAMS, pipeline_overrides(tiny_model_dir, tmp_path) + GRID + ["tracking.enabled=false"])
    out = run_stage(p.model_dump(), "transfer")
    folder, data = transfer_dir(p), transfer_data_dir(p)
    assert Path(out["dir"]) == folder and folder == Path(p.paths.reports) / "transfer" / "two-ranks"
    assert out["rows"] == ["r1", "mixed"] and out["columns"] == ["r1", "r4"] and out["by_rank"]

    # matrix files written and parsed back
    m = json.loads((folder / "matrix.json").read_text())
    assert m["rows"] == out["rows"] and m["columns"] == out["columns"]
    for row in m["rows"]:
        for col in m["columns"]:
            cell = m["matrix"][row][col]
            assert cell["n"] == 3 and 0 <= cell["top1"] <= 1 and 0 <= cell["exact"] <= 1 and 0 <= cell["token_f1"] <= 1
            assert cell["top1_ci"][0] <= cell["top1"] <= cell["top1_ci"][1] and cell["top1_chance"] == pytest.approx(1 / 3)
    md = (folder / "matrix.md").read_text()
    assert md == out["table"]
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0] == "| trained on | r1 | r4 |"
    for line, row in zip(table[1:3], m["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row
        for text, col in zip(cells[1:], m["columns"]):
            top1, lo, hi, exact, f1 = map(float, text.replace("[", "").replace("]", "").replace(",", "")
                                          .replace("/", "").split())
            cell = m["matrix"][row][col]
            assert (top1, exact, f1) == (round(cell["top1"], 2), round(cell["exact"], 2), round(cell["token_f1"], 2))
    assert "| r4 | diffs.rank=4 | 4 | 3 | 0 | 3 | 0 |" in md
    for name in ("r1", "r4"):  # each variant's mean behaviour check, in matrix.json and matrix.md
        ds = pl.read_parquet(data / name / "dataset" / "dataset.parquet")
        check = m["variants"][name]["check"]
        assert set(check) == {"trigger_hit", "wrong_prefix_hit", "no_trigger_hit", "check_kl"}
        assert all(check[c] == pytest.approx(round(ds[c].mean(), 3)) for c in check)
        assert "kept_share" not in check  # LoRA diffs: nothing reduced
        assert f"| {check['trigger_hit']:.3f} | {check['wrong_prefix_hit']:.3f} |" in md
    assert (folder / "matrix.png").stat().st_size > 1000 and (folder / "rank.png").stat().st_size > 1000

    # each variant in its own store with its own ids, the same topics; the r4 data copied from r1's
    for name, rank in (("r1", 1), ("r4", 4)):
        manifest = pl.read_parquet(data / name / "diffs" / "hidden_topic" / "manifest.parquet")
        assert (manifest["rank"] == rank).all() and manifest["diff_id"].str.starts_with(f"{name}_ht").all()
    s1 = pl.read_parquet(data / "r1" / "behaviors" / "hidden_topic" / "samples.parquet")
    s4 = pl.read_parquet(data / "r4" / "behaviors" / "hidden_topic" / "samples.parquet")
    assert s4.equals(s1.with_columns(pl.col("diff_id").str.replace("^r1_", "r4_")))
    # the r1 row learned from rank-1 diffs only, the mixed row from both; every row was tested on both
    ds = {row: pl.read_parquet(folder / row / "dataset" / "dataset.parquet") for row in m["rows"]}
    assert ds["r1"]["diff_id"].str.starts_with("r1_").all() and ds["r1"].height == 3
    assert set(ds["mixed"]["diff_id"].str.slice(0, 3)) == {"r1_", "r4_"} and ds["mixed"].height == 6
    preds = pl.read_parquet(folder / "r1" / "r4" / "predictions.parquet")
    assert preds["diff_id"].str.starts_with("r4_").all() and preds.height == 3

    # a rerun (now tracked) trains nothing: interpreter weights, shards and cells untouched; cells logged
    weights = _mtimes(folder, "interpreter/*.safetensors") | _mtimes(data, "shard-*.safetensors") | \
        _mtimes(folder, "cell.json") | _mtimes(data, "samples.parquet")
    assert len([k for k in weights if "/interpreter/" in k]) >= 2
    p2 = load_params(PARAMS, pipeline_overrides(tiny_model_dir, tmp_path) + GRID + ["tracking.enabled=true"])
    again = run_stage(p2.model_dump(), "transfer")
    assert again["matrix"] == out["matrix"]
    assert (_mtimes(folder, "interpreter/*.safetensors") | _mtimes(data, "shard-*.safetensors")
            | _mtimes(folder, "cell.json") | _mtimes(data, "samples.parquet")) == weights
    import mlflow

    run = mlflow.search_runs(experiment_names=[p2.tracking.experiment], output_format="list")[0]
    assert run.data.metrics["transfer.mixed.r4.top1"] == pytest.approx(out["matrix"]["mixed"]["r4"]["top1"])

    # r4 made again with other settings under the same ids (its old store deleted, as the refusal says):
    # the row that learned from r4 retrains and every r4 cell is scored again; the r1 row and r1 cells stay.
    import shutil

    shutil.rmtree(data / "r4" / "diffs")
    grid = [g.replace("overrides: [diffs.rank=4]", "overrides: [diffs.rank=4, diffs.alpha=8]") for g in GRID]
    p3 = load_params(PARAMS, pipeline_overrides(tiny_model_dir, tmp_path) + grid + ["tracking.enabled=false"])
    run_stage(p3.model_dump(), "transfer")
    weights_now = _mtimes(folder, "interpreter/*.safetensors")
    cells_now = _mtimes(folder, "cell.json")
    key = lambda row, col: str(folder / row / col / "cell.json")  # noqa: E731
    r1_weights = [k for k in weights if f"{folder}/r1/" in k and "/interpreter/" in k]
    assert all(weights_now[k] == weights[k] for k in r1_weights)
    assert any(weights_now[k] != weights[k] for k in weights if f"{folder}/mixed/interpreter/" in k)
    assert cells_now[key("r1", "r1")] == weights[key("r1", "r1")]
    for row, col in (("r1", "r4"), ("mixed", "r1"), ("mixed", "r4")):
        assert cells_now[key(row, col)] != weights[key(row, col)], (row, col)


def test_grid_refusals(tiny_model_dir, tmp_path):
    from dit_core.config import ConfigError, load_params
    from dit_core.evaluation.transfer import _check_grid, variant_params

    base = pipeline_overrides(tiny_model_dir, tmp_path)
    p = load_params(PARAMS, base + ["transfer.rows=[{name: r1, train: [r2]}]"])
    with pytest.raises(ConfigError, match=r"trains on \['r2'\], which are not in transfer.variants"):
        _check_grid(p)
    p = load_params(PARAMS, base + ["transfer.variants=[{name: a, overrides: []}, {name: a, overrides: []}]"])
    with pytest.raises(ConfigError, match=r"names \['a'\] more than once"):
        _check_grid(p)
    with pytest.raises(ConfigError, match="variant 'x'.*interpreter.rank=2.*interpreter and evaluation settings"):
        variant_params(load_params(PARAMS, base), "x", ["interpreter.rank=2"])
    with pytest.raises(ConfigError, match="variant 'x'.*diffs.rank"):
        variant_params(load_params(PARAMS, base), "x", ["diffs.rank=0"])
    with pytest.raises(ConfigError, match="transfer.variants.0.name"):  # a space
        load_params(PARAMS, base + ["transfer.variants=[{name: 'r 1', overrides: []}]"])


def test_one_store_of_several_ranks_pads_and_describes(tiny_model_dir, tmp_path):
    """diffs.ranks: one rank per shard, cycling; loading across shards zero-pads to the highest rank and keeps
    each diff; describe reads them."""
    from dit_core.config import load_params
    from dit_core.diffs.bank import DiffBank
    from dit_core.diffs.generate import generate_diffs
    from dit_core.diffs.store import DiffStore, read_shard
    from dit_core.modeling.lora import DiffModel
    from dit_core.modeling.models import load_model
    from dit_core.stages import run_make_data, stage_paths

    p = load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp_path / "data") + [
        "diffs.ranks=[1, 3]", "diffs.alpha=2", "diffs.diffs_per_batch=2", "diffs.steps=2", "diffs.check=false"])
    run_make_data(p)
    paths = stage_paths(p)
    lm = load_model(tiny_model_dir, "cpu", "float32")
    generate_diffs(p, lm, paths.behavior, paths.diffs)
    m = pl.read_parquet(paths.diffs / "manifest.parquet").sort("diff_id")
    assert m["rank"].to_list() == [1, 1, 3, 3, 1, 1]
    assert m["scale"].to_list() == pytest.approx([2, 2, 2 / 3, 2 / 3, 2, 2])
    shapes = DiffModel(lm.model).shapes()
    ids = ["ht00000", "ht00002"]  # rank 1 (shard 0) and rank 3 (shard 1)
    loaded = DiffStore(paths.diffs).load(ids, shapes, lm.sha256)
    assert loaded.rank == 3 and loaded.scale == 1.0  # differing scales folded into A
    s0, s1 = (read_shard(paths.diffs / f"shard-0000{i}.safetensors") for i in (0, 1))
    mod = next(iter(shapes))
    for k, (shard, row) in enumerate(((s0, 0), (s1, 0))):
        want = shard.scale * shard.B[mod][row] @ shard.A[mod][row]
        assert torch.allclose(loaded.scale * loaded.B[mod][k] @ loaded.A[mod][k], want, atol=1e-6)
    bank = DiffBank(m.with_columns(store=pl.lit(str(paths.diffs))), shapes, lm.sha256)
    A, B, scale = bank.get(ids)
    assert A[mod].shape[1] == 3 and torch.allclose(scale, torch.tensor([2.0, 2 / 3]))
    assert torch.allclose(scale[0] * B[mod][0] @ A[mod][0], s0.scale * s0.B[mod][0] @ s0.A[mod][0], atol=1e-6)
    # a store of one rank keeps its run record: stores made before diffs.ranks existed still resume
    run = json.loads((paths.diffs / "run.json").read_text())
    assert run["diffs"]["ranks"] == [1, 3]
    one = load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp_path / "one") + ["diffs.steps=1", "diffs.check=false"])
    run_make_data(one)
    generate_diffs(one, lm, stage_paths(one).behavior, stage_paths(one).diffs)
    assert "ranks" not in json.loads((stage_paths(one).diffs / "run.json").read_text())["diffs"]


def test_rank_plot_takes_the_lora_columns():
    from dit_core.evaluation.transfer import rank_columns

    info = {"r1": {"rank": 1, "mode": "lora"}, "r4": {"rank": 4, "mode": "lora"},
            "full": {"rank": 8, "mode": "full"}, "peft": {"rank": 8, "mode": "peft"}}
    assert rank_columns(info) == ["r1", "r4"]  # full finetunes and peft-made adapters: in the matrix only
    assert rank_columns({**info, "r4b": {"rank": 4, "mode": "lora"}}) == []  # two columns of one rank
    assert rank_columns({"r1": info["r1"], "full": info["full"]}) == []  # one LoRA rank: nothing to plot
    assert rank_columns({"r1": {"rank": 1}, "r2": {"rank": 2}}) == ["r1", "r2"]  # matrices written before modes
