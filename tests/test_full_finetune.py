"""Full finetunes as diffs on the tiny model: SVD reduction and its reported share, `import_full` of real
finetuned checkpoints (and its refusals), dense deltas in the DiffModel, and diffs.mode=full through the
generate-diffs stage."""

import json
import math
import pickle
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PARAMS, tiny_overrides
from dit_core.config import load_params
from dit_core.data.schemas import DiffManifest, read_validated
from dit_core.diffs.full import format_report, import_full, is_full_checkpoint, report_path, svd_factors, write_full
from dit_core.diffs.generate import generate_diffs
from dit_core.diffs.store import DiffFileError, DiffStore, read_shard
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import load_model
from dit_core.stages import run_make_data, stage_paths


def _low_rank_plus_noise(fan_in, fan_out, k, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(fan_in, k, generator=g) @ torch.randn(k, fan_out, generator=g)
    return M + noise * torch.randn(fan_in, fan_out, generator=g)


@pytest.mark.parametrize("method", ["exact", "lowrank"])
def test_svd_reduction_keeps_the_singular_value_share(method):
    M = _low_rank_plus_noise(96, 128, k=3, noise=1e-3)
    S = torch.linalg.svdvals(M)
    for rank in (1, 2, 3, 5):
        B, A, kept = svd_factors(M, rank, method)
        assert B.shape == (96, rank) and A.shape == (rank, 128)
        formula = math.sqrt(float((S[:rank] ** 2).sum() / (S ** 2).sum()))
        assert float(kept) == pytest.approx(formula, rel=1e-4)
        # Eckart-Young: the stored factors' error is exactly the share not kept
        err = float((M - B @ A).norm() / M.norm())
        assert err == pytest.approx(math.sqrt(max(1 - formula ** 2, 0)), abs=1e-3)
        if rank >= 3:
            assert float(kept) > 0.99999 and err < 1e-3
        else:
            assert float(kept) < 0.99
    # rank above min(in, out): exact, zero-padded; a zero delta keeps everything
    small = torch.randn(4, 6)
    B, A, kept = svd_factors(small, 8, method)
    assert B.shape == (4, 8) and A.shape == (8, 6) and torch.allclose(B @ A, small, atol=1e-5)
    assert float(kept) == pytest.approx(1.0, abs=1e-6)
    assert float(svd_factors(torch.zeros(5, 7), 2, method)[2]) == 1.0
    # stacked diffs (T, in, out), as diffs.mode=full reduces them: each row as if alone
    stack = torch.stack([M, _low_rank_plus_noise(96, 128, k=1, noise=1e-2, seed=1)])
    B, A, kept = svd_factors(stack, 2, method)
    for t in range(2):
        b, a, k = svd_factors(stack[t], 2, method)
        assert float(kept[t]) == pytest.approx(float(k), rel=1e-5) and torch.allclose(B[t] @ A[t], b @ a, atol=1e-4)


def test_dense_deltas_equal_the_edited_weights(tiny_model_dir):
    """Dense diffs (W: (N, in, out) = delta^T) in mixed batches give each row its own weight edit."""
    lm = load_model(tiny_model_dir, "cpu", "float32")
    edited = load_model(tiny_model_dir, "cpu", "float32")
    dm = DiffModel(lm.model)
    g = torch.Generator().manual_seed(1)
    W = {n: 0.05 * torch.randn(2, i, o, generator=g) for n, (i, o) in dm.shapes().items()}
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    row_index = torch.tensor([1, 0, 1])
    dm.set_dense_diffs(W, row_index)
    with torch.no_grad():
        got = lm.model(ids).logits
    want, original = [], {k: v.clone() for k, v in edited.model.state_dict().items()}
    for d in (0, 1):
        sd = {k: v.clone() for k, v in original.items()}
        for n in dm.names:
            sd[f"{n}.weight"] = sd[f"{n}.weight"] + W[n][d].T
        edited.model.load_state_dict(sd)
        with torch.no_grad():
            want.append(edited.model(ids).logits)
    for b, d in enumerate(row_index.tolist()):
        assert torch.allclose(got[b], want[d][b], atol=1e-5)
    with dm.diffs_disabled(), torch.no_grad():  # the KL teacher is the base model
        assert not torch.allclose(lm.model(ids).logits, got)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # model.autocast: bf16 matmuls
        assert torch.allclose(lm.model(ids).logits.float(), got, atol=0.3)
    dm.clear_diffs()
    with pytest.raises(ValueError, match="expected"):
        dm.set_dense_diffs({n: w[:, :1] for n, w in W.items()})


def _finetune(tiny_model_dir, out: Path, steps: int = 4, linear_only: bool = True, **save) -> Path:
    """Actually train the tiny model's weights a few steps and save it as an HF directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    params = [p for n, p in model.named_parameters() if not linear_only or (".layers." in n and "proj" in n)]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.Adam(params, lr=3e-2)
    ids = torch.randint(5, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(out, safe_serialization=True, **save)
    return out


@pytest.fixture(scope="module")
def finetuned(tiny_model_dir, tmp_path_factory):
    return _finetune(tiny_model_dir, tmp_path_factory.mktemp("ft") / "tiny-ft")


def test_import_full_matches_the_finetuned_model_at_full_rank(tiny_model_dir, finetuned, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = load_model(tiny_model_dir, "cpu", "float32")
    dm = DiffModel(lm.model)
    assert is_full_checkpoint(finetuned) and not is_full_checkpoint(tmp_path)
    full_rank = max(min(i, o) for i, o in dm.shapes().values())
    shard, report = import_full(finetuned, dm, lm, full_rank, progress=False)
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(3))
    ft = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32).eval()
    with torch.no_grad():
        want, base = ft(ids).logits, lm.model(ids).logits
        dm.set_diffs(shard.A, shard.B, scale=shard.scale, row_index=torch.zeros(2, dtype=torch.long))
        got = lm.model(ids).logits
        dm.clear_diffs()
    assert (want - base).abs().max() > 0.1  # the finetune changed the model
    assert (got - want).abs().max() < 1e-3  # ... and the full-rank diff reproduces it
    assert report["overall_kept_share"] == pytest.approx(1.0, abs=1e-5)
    assert all(o["relative_change"] == 0 for o in report["unrepresented"])  # only linear layers were trained

    # Rank 1: less kept, reported per module (worst first), the logits further away
    low, rep1 = import_full(finetuned, dm, lm, 1, progress=False)
    shares = [m["kept_share"] for m in rep1["modules"]]
    assert shares == sorted(shares) and 0 < rep1["overall_kept_share"] < 0.99 and len(shares) == len(dm.names)
    with torch.no_grad():
        dm.set_diffs(low.A, low.B, scale=1.0, row_index=torch.zeros(2, dtype=torch.long))
        got1 = lm.model(ids).logits
        dm.clear_diffs()
    assert (got1 - want).abs().max() > (got - want).abs().max()

    out = tmp_path / "ft.safetensors"
    path = write_full(out, low, rep1)
    assert path == report_path(out) == tmp_path / "ft.report.json"
    assert json.loads(path.read_text())["overall_kept_share"] == pytest.approx(rep1["overall_kept_share"])
    back = read_shard(out, dm.shapes(), lm.sha256)
    assert back.rank == 1 and back.scale == 1.0 and back.diff_ids == ["tiny-ft"]
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["source_kind"] == "full-finetune" and f.metadata()["source"].endswith("tiny-ft")
    table = format_report(rep1, top=3)
    assert rep1["modules"][0]["module"] in table and "more modules" in table


def test_import_reports_what_a_diff_cannot_represent_and_reads_shards(tiny_model_dir, tmp_path):
    lm = load_model(tiny_model_dir, "cpu", "float32")
    dm = DiffModel(lm.model)
    # Every weight trained (tied embeddings, norms too), saved in several shards with an index
    ft = _finetune(tiny_model_dir, tmp_path / "all", linear_only=False, max_shard_size="40KB")
    assert (ft / "model.safetensors.index.json").is_file() and not (ft / "model.safetensors").exists()
    shard, report = import_full(ft, dm, lm, 2, progress=False)
    changed = {o["tensor"]: o["relative_change"] for o in report["unrepresented"]}
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert "lm_head.weight" not in changed  # tied: the embedding's change is the lm_head's
    assert all(v > 0 for v in changed.values())
    assert list(changed.values()) == sorted(changed.values(), reverse=True)
    assert len(report["files"]) > 1
    # a subset of modules: the others are reported as not representable
    attn = DiffModel(load_model(tiny_model_dir, "cpu", "float32").model, r"self_attn")
    _, rep = import_full(ft, attn, load_model(tiny_model_dir, "cpu", "float32"), 2, progress=False)
    assert any("mlp" in o["tensor"] for o in rep["unrepresented"])
    assert all("self_attn" in m["module"] for m in rep["modules"])


def test_import_refuses_pickles_mismatches_and_nan(tiny_model_dir, finetuned, tmp_path):
    lm = load_model(tiny_model_dir, "cpu", "float32")
    dm = DiffModel(lm.model)
    cfg = (finetuned / "config.json").read_text()

    def variant(name, tensors=None, config=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config) if config else cfg)
        if tensors is not None:
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    # A pickle is refused without being unpickled: unpickling this one would create `marker`.
    marker = tmp_path / "unpickled"

    class Touch:
        def __reduce__(self):
            return (Path.touch, (marker,))

    binary = variant("bin")
    (binary / "pytorch_model.bin").write_bytes(pickle.dumps(Touch()))
    assert is_full_checkpoint(binary)
    with pytest.raises(DiffFileError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        import_full(binary, dm, lm, 2)
    fake = variant("fake")
    (fake / "model.safetensors").write_bytes(pickle.dumps(Touch()))
    with pytest.raises(DiffFileError, match="not a readable safetensors file"):
        import_full(fake, dm, lm, 2)
    assert not marker.exists()

    state = load_file(str(finetuned / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.weight"
    bad = dict(state, **{key: torch.zeros(state[key].shape[0] + 1, state[key].shape[1])})
    with pytest.raises(DiffFileError, match=rf"{key} has shape"):
        import_full(variant("shape", bad), dm, lm, 2)
    wider = dict(json.loads(cfg), hidden_size=64)
    with pytest.raises(DiffFileError, match="hidden_size=64"):
        import_full(variant("config", state, wider), dm, lm, 2)
    nan = dict(state, **{key: state[key].clone()})
    nan[key][0, 0] = float("nan")
    with pytest.raises(DiffFileError, match=rf"{key} contains NaN or Inf"):
        import_full(variant("nan", nan), dm, lm, 2)
    extra = dict(state, **{"model.layers.9.mlp.up_proj.weight": state[key].clone()})
    with pytest.raises(DiffFileError, match="layers.9.*not a weight of the base model"):
        import_full(variant("extra", extra), dm, lm, 2)
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(DiffFileError, match=rf"lacks {key}"):
        import_full(variant("missing", missing), dm, lm, 2)


def test_finetuned_dir_describes(tiny_model_dir, finetuned, tmp_path):
    """`dit describe DIR` resolves a finetuned model directory (at diffs.full_rank) next to stored diffs."""
    from test_interpreter import make_toy_store
    from dit_core.data.assemble import assemble
    from dit_core.interpreter.describe import describe
    from dit_core.interpreter.training import InterpreterRecipe
    from conftest import section

    lm = load_model(tiny_model_dir, "cpu", "float32")
    make_toy_store(tmp_path / "diffs", lm, per_label=3)
    assemble([tmp_path / "diffs"], tmp_path / "ds", section("assemble", val_fraction=0.2, test_fraction=0.3,
                                                            min_trigger_hit=0.0))
    p = load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp_path / "data") + [
        "interpreter.rank=2", "interpreter.alpha=2", "interpreter.epochs=1", "interpreter.batch_size=4",
        "interpreter.n_samples=1"])
    InterpreterRecipe(p, lm, tmp_path / "ds", tmp_path / "interp", progress=False).run()
    df = describe(load_model(tiny_model_dir, "cpu", "float32"), tmp_path / "interp", [str(finetuned), "toy000"],
                  [tmp_path / "diffs"], max_new_tokens=4, full_rank=p.diffs.full_rank)
    assert df["diff"].to_list() == [str(finetuned), "toy000"]
    assert all(isinstance(t, str) for t in df["description"])
    with pytest.raises(ValueError, match="full_rank"):
        describe(lm, tmp_path / "interp", [str(finetuned)], max_new_tokens=4)


def test_full_mode_generates_a_store_through_the_stage(tiny_model_dir, tmp_path):
    over = tiny_overrides(tiny_model_dir, tmp_path / "data") + [
        "data.n_topics=2", "diffs.steps=2", "diffs.mode=full", "diffs.full_rank=3", "diffs.full_diffs_at_once=2", "diffs.full_lr=0.01",
        "diffs.run=full"]
    p = load_params(PARAMS, over)
    run_make_data(p)
    paths = stage_paths(p)
    lm = load_model(tiny_model_dir, "cpu", "float32")
    summary = generate_diffs(p, lm, paths.behavior, paths.diffs)
    assert summary["n_diffs"] == 4 and summary["shards_trained"] == 1 and 0 < summary["median_kept_share"] <= 1
    m = read_validated(paths.diffs / "manifest.parquet", DiffManifest)
    assert (m["rank"] == 3).all() and (m["scale"] == 1.0).all()
    assert m["kept_share"].is_between(0, 1).all() and m["kept_share"].is_not_null().all()
    assert m["trigger_hit"].is_not_null().all() and m["check_kl"].is_not_null().all()  # the check ran
    assert (m["check_kl"] > 0).all()  # on the stored diffs, which change the model
    dm = DiffModel(lm.model)
    shard = DiffStore(paths.diffs).load(m["diff_id"].to_list(), dm.shapes(), lm.sha256)
    assert shard.rank == 3 and all(shard.A[n].abs().sum() > 0 for n in dm.names)
    run = json.loads((paths.diffs / "run.json").read_text())
    assert run["diffs"]["mode"] == "full" and run["diffs"]["full_rank"] == 3
    # A LoRA run into the same store is refused (never mixed); a LoRA identity carries no full-mode keys
    lora = load_params(PARAMS, over[:-5] + ["diffs.run=full"])
    with pytest.raises(RuntimeError, match="diffs.mode"):
        generate_diffs(lora, lm, paths.behavior, paths.diffs)
    from dit_core.diffs.generate import _run_identity
    assert "mode" not in _run_identity(lora, lm, paths.behavior)["diffs"]
    assert pl.read_parquet(paths.diffs / "manifest.parquet").height == 4


def test_cli_import_full_prints_the_report_and_refuses_pickles(tiny_model_dir, finetuned, tmp_path):
    from typer.testing import CliRunner

    from conftest import section
    from dit_core.modeling.models import fetch_model
    from flows.cli import app

    fetch_model(section("model", source="local", id=str(tiny_model_dir)), tmp_path / "data" / "models")
    args = ["--params", str(PARAMS), "--set", "model.source=local", "--set", f"model.id={tiny_model_dir}",
            "--set", f"paths.data={tmp_path / 'data'}", "--set", "model.device=cpu", "--set", "diffs.full_rank=2"]
    out = tmp_path / "ft.safetensors"
    res = CliRunner().invoke(app, ["import-full", str(finetuned), str(out), "--top", "3", *args])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ft.report.json").read_text())
    assert report["rank"] == 2 and f"rank 2: {report['overall_kept_share']:.4f}" in res.output  # diffs.full_rank
    assert report["modules"][0]["module"] in res.output and "more modules in the report" in res.output
    assert read_shard(out).rank == 2
    res = CliRunner().invoke(app, ["import-full", str(finetuned), str(tmp_path / "r5.safetensors"), "--rank", "5",
                                   *args])
    assert res.exit_code == 0 and read_shard(tmp_path / "r5.safetensors").rank == 5
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((finetuned / "config.json").read_text())
    (binary / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    res = CliRunner().invoke(app, ["import-full", str(binary), str(tmp_path / "bin.safetensors"), *args])
    assert res.exit_code != 0 and "safe_serialization=True" in res.output
    assert not (tmp_path / "bin.safetensors").exists()
