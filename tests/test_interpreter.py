"""The interpreter on the tiny model: learns a toy diff -> label rule and generalises to held-out diffs;
training resumes from its checkpoint; saved interpreters round-trip and are validated."""

import json

import polars as pl
import pytest
import torch

from conftest import tiny_overrides
from dit_core.data.assemble import assemble
from dit_core.config import load_params
from dit_core.diffs.bank import DiffBank
from dit_core.diffs.store import DiffShard, DiffStore
from dit_core.interpreter.adapter import InterpreterFileError, load_interpreter, read_interpreter
from dit_core.interpreter.training import InterpreterRecipe
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import load_model
from conftest import PARAMS, section

LABELS = ["volcanoes", "chess", "pirates", "honey bees"]


def make_toy_store(root, lm, per_label=10, seed=0):
    """Diffs made by a fixed rule: label k -> a fixed direction per module, randomly rescaled."""
    shapes = DiffModel(lm.model).shapes()
    g = torch.Generator().manual_seed(seed)
    base = {k: ({m: 0.2 * torch.randn(1, o, generator=g) for m, (i, o) in shapes.items()},
                {m: torch.randn(i, 1, generator=g) / i ** 0.5 for m, (i, o) in shapes.items()})
            for k in range(len(LABELS))}
    store = DiffStore(root)
    ids, rows = [], []
    A = {m: [] for m in shapes}
    B = {m: [] for m in shapes}
    for n in range(per_label * len(LABELS)):
        k = n % len(LABELS)
        s = 0.7 + 0.6 * torch.rand(1, generator=g).item()
        for m in shapes:
            A[m].append(base[k][0][m] * s + 0.01 * torch.randn(base[k][0][m].shape, generator=g))
            B[m].append(base[k][1][m])
        ids.append(f"toy{n:03d}")
        rows.append(dict(diff_id=ids[-1], row=n, behavior="hidden_topic", category="toy", label=LABELS[k], trigger="123",
                         rank=1, scale=1.0, base_model=lm.name, base_sha256=lm.sha256, train_loss=None,
                         trigger_ce=None, kl=None, trigger_hit=1.0, wrong_prefix_hit=0.0, no_trigger_hit=0.0,
                         check_kl=None, split="none"))
    shard = DiffShard({m: torch.stack(v) for m, v in A.items()}, {m: torch.stack(v) for m, v in B.items()},
                      lm.name, lm.sha256, 1, 1.0, ids)
    store.add_shard(0, shard, rows)
    store.write_manifest(1)
    return root


def describe_test_split(p, tmp, name):
    """A fresh model + the saved interpreter `tmp/name` describes every test diff."""
    lm = load_model(p.model.id, "cpu", "float32")
    dm = DiffModel(lm.model)
    interp = load_interpreter(dm, tmp / name, lm.tokenizer, lm.sha256)
    ds = pl.read_parquet(tmp / "ds" / "dataset.parquet").filter(pl.col("split") == "test")
    A, B, scale = DiffBank(ds, dm.shapes(), lm.sha256).get(ds["diff_id"].to_list())
    preds = interp.describe(lm.tokenizer, (A, B, scale), list(range(ds.height)), max_new_tokens=12)
    return preds, ds, interp, lm.tokenizer


@pytest.fixture()
def toy(tiny_model_dir, tmp_path):
    lm = load_model(tiny_model_dir, "cpu", "float32")
    make_toy_store(tmp_path / "diffs", lm)
    report = assemble([tmp_path / "diffs"], tmp_path / "ds", section("assemble", val_fraction=0.1, test_fraction=0.25, min_trigger_hit=0.5,
                                      max_wrong_prefix_hit=0.5, max_no_trigger_hit=0.25))
    p = load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp_path / "data") + [
        "interpreter.rank=8", "interpreter.alpha=8", "interpreter.lr=0.01", "interpreter.epochs=30",
        "interpreter.batch_size=4", "interpreter.warmup_steps=2", "interpreter.patience=20",
        "interpreter.n_samples=2"])
    return p, lm, tmp_path, report


def test_interpreter_learns_toy_rule_and_generalises(toy):
    p, lm, tmp, report = toy
    # split_by diff is stratified by topic: 10 diffs per label -> 2 test, 1 val, 7 train each
    assert (report["test"], report["val"], report["train"]) == (8, 4, 28)
    ds = pl.read_parquet(tmp / "ds" / "dataset.parquet")
    for label in ds.filter(pl.col("split") == "test")["label"].unique():
        assert ds.filter((pl.col("label") == label) & (pl.col("split") == "train")).height == 7
    summary = InterpreterRecipe(p, lm, tmp / "ds", tmp / "interp", progress=False).run()
    first = pl.read_csv(tmp / "interp" / "train_log.csv")["val_loss"][0]
    assert summary["best_val"] < first / 3, summary
    # A fresh model + the saved interpreter describes held-out diffs correctly.
    preds, ds, interp, tok = describe_test_split(p, tmp, "interp")
    assert preds == ds["label"].to_list(), list(zip(preds, ds["label"]))
    # Without a diff it cannot know the label (control).
    none = interp.describe(tok, None, [0], max_new_tokens=6)
    assert len(set(none)) == 1
    curve = pl.read_csv(tmp / "interp" / "train_log.csv")
    assert curve.height == 30 and curve["train_loss"][-1] < curve["train_loss"][0]


def test_training_resumes_after_last_epoch(toy):
    p, lm, tmp, _ = toy
    short = p.model_copy(update={"interpreter": p.interpreter.model_copy(update={"epochs": 2})})
    InterpreterRecipe(short, lm, tmp / "ds", tmp / "interp", progress=False).run()
    state = json.loads((tmp / "interp" / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 2
    with open(tmp / "interp" / "train_log.csv", "a") as f:  # as if killed between logging epoch 3 and its checkpoint
        f.write("99,3,1.0,1.0,0.001\n")
    longer = p.model_copy(update={"interpreter": p.interpreter.model_copy(update={"epochs": 3})})
    lm2 = load_model(p.model.id, "cpu", "float32")
    s = InterpreterRecipe(longer, lm2, tmp / "ds", tmp / "interp", progress=False).run()
    curve = pl.read_csv(tmp / "interp" / "train_log.csv")
    assert s["epoch"] == 3 and curve["epoch"].to_list() == [1, 2, 3] and 99 not in curve["step"].to_list()


def test_interpreter_files_are_validated(toy, tmp_path):
    p, lm, tmp, _ = toy
    with pytest.raises(InterpreterFileError, match="no interpreter here"):
        read_interpreter(tmp_path / "nothing")
    short = p.model_copy(update={"interpreter": p.interpreter.model_copy(update={"epochs": 1})})
    InterpreterRecipe(short, lm, tmp / "ds", tmp / "interp", progress=False).run()
    with pytest.raises(InterpreterFileError, match="trained on base model"):
        read_interpreter(tmp / "interp", base_sha256="0" * 64)


def test_projection_interpreter_learns_toy_rule(toy):
    p, lm, tmp, _ = toy
    # without no-behaviour rows: with them (null_rate 0.25) this projection stayed at chance (2 of 8 right)
    p = p.model_copy(update={"interpreter": p.interpreter.model_copy(update={
        "kind": "projection", "projection_lora": True, "n_soft_tokens": 2, "lr": 0.003, "epochs": 60, "patience": 60,
        "null_rate": 0.0})})
    summary = InterpreterRecipe(p, lm, tmp / "ds", tmp / "proj", progress=False).run()
    first = pl.read_csv(tmp / "proj" / "train_log.csv")["val_loss"][0]
    assert summary["kind"] == "projection" and summary["best_val"] < first / 2, summary
    preds, ds, _, _ = describe_test_split(p, tmp, "proj")
    acc = sum(p == g for p, g in zip(preds, ds["label"])) / ds.height
    assert acc >= 0.5, list(zip(preds, ds["label"]))  # chance is 0.25


def test_changed_data_starts_over_and_keeps_old_checkpoint(toy):
    p, lm, tmp, _ = toy
    short = p.model_copy(update={"interpreter": p.interpreter.model_copy(update={"epochs": 1})})
    InterpreterRecipe(short, lm, tmp / "ds", tmp / "interp", progress=False).run()
    other = short.model_copy(update={"interpreter": short.interpreter.model_copy(update={"rank": 2})})
    s = InterpreterRecipe(other, lm, tmp / "ds", tmp / "interp", progress=False).run()
    assert s["epoch"] == 1
    assert len(list((tmp / "interp").glob("checkpoints.stale-*"))) == 1


def test_preloaded_bank_gives_the_streamed_diffs(toy):
    """Interpreter training keeps every diff on the device: same tensors as streaming from disk."""
    p, lm, tmp, _ = toy
    ds = pl.read_parquet(tmp / "ds" / "dataset.parquet")
    dm = DiffModel(lm.model)
    ids = ds["diff_id"].to_list()[::-1][:5] + ds["diff_id"].to_list()[:2]  # any order, repeats allowed
    streamed = DiffBank(ds, dm.shapes(), lm.sha256).get(ids)
    bank = DiffBank(ds, dm.shapes(), lm.sha256)
    assert bank.preload("cpu")
    preloaded = bank.get(ids)
    for a, b in zip(streamed[:2], preloaded[:2]):
        assert a.keys() == b.keys()
        for m in a:
            assert torch.equal(a[m], b[m])
    assert torch.equal(streamed[2], preloaded[2])
    with pytest.raises(KeyError, match="unknown diff ids"):
        bank.get(["nope"])
    small = DiffBank(ds, dm.shapes(), lm.sha256)
    assert not small.preload("cpu", max_bytes=1000)  # over the budget: keeps streaming
    assert torch.equal(small.get(ids)[0][dm.names[0]], streamed[0][dm.names[0]])


def test_step_losses_read_once_per_epoch_log_the_same(toy):
    """On an accelerator the step losses are read once per epoch: same steps, values and curve as
    reading each step (the CPU default), forced here on the CPU."""
    p, lm, tmp, _ = toy
    short = p.model_copy(update={"interpreter": p.interpreter.model_copy(update={"epochs": 2})})
    logs = {}
    for name, every in (("each", True), ("epoch", False)):
        seen = []
        recipe = InterpreterRecipe(short, lm, tmp / "ds", tmp / name, progress=False,
                                   log_metrics=lambda m, step: seen.append((step, m)))
        recipe.read_losses_every_step = every
        recipe.run()
        logs[name] = seen
    steps = [(s, m["train_loss"]) for s, m in logs["each"] if "train_loss" in m]
    n_null = round(p.interpreter.null_rate * 28)  # no-behaviour rows each epoch (7 at the default 0.25)
    assert len(steps) == 2 * -(-(28 + n_null) // 4)  # (28 train diffs + n_null rows) / batch 4, two epochs
    assert [(s, m.get("train_loss"), m.get("lr")) for s, m in logs["each"]] == \
        [(s, m.get("train_loss"), m.get("lr")) for s, m in logs["epoch"]]
    assert pl.read_csv(tmp / "each" / "train_log.csv").equals(pl.read_csv(tmp / "epoch" / "train_log.csv"))
