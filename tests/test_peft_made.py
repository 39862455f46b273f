"""diffs.mode=peft on the tiny model: diffs trained with `peft` itself, saved as adapters and imported, so
that the store holds exactly what peft's own model computes; through the generate-diffs stage."""

import json
import math

import pytest
import torch

from conftest import PARAMS, tiny_overrides
from dit_core.config import load_params
from dit_core.data.schemas import DiffManifest, read_validated
from dit_core.diffs.generate import _run_identity, generate_diffs
from dit_core.diffs.peft_made import peft_scale, train_peft_diffs, unwrapped_view
from dit_core.diffs.store import DiffStore
from dit_core.modeling.lora import DiffLinear, DiffModel
from dit_core.modeling.models import load_model
from dit_core.stages import run_make_data, stage_paths


def _params(tiny_model_dir, tmp_path, *extra):
    return load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp_path / "data") + [
        "data.n_topics=2", "diffs.steps=4", "diffs.mode=peft", "diffs.peft_rank=4", "diffs.peft_alpha=8",
        "diffs.peft_lr=0.01", "diffs.run=peft", *extra])


def test_unwrapped_view_shares_the_weights_and_leaves_the_model_wrapped(tiny_model_dir):
    lm = load_model(tiny_model_dir, "cpu", "float32")
    dm = DiffModel(lm.model)
    view = unwrapped_view(lm.model)
    assert not any(isinstance(m, DiffLinear) for m in view.modules())
    assert all(isinstance(lm.model.get_submodule(n), DiffLinear) for n in dm.names)
    assert {id(p) for p in view.parameters()} == {id(p) for p in lm.model.parameters()}
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(view(ids).logits, lm.model(ids).logits)


def test_peft_mode_stores_what_peft_computes(tiny_model_dir, tmp_path):
    from peft import PeftModel

    p = _params(tiny_model_dir, tmp_path)
    run_make_data(p)
    paths = stage_paths(p)
    lm = load_model(tiny_model_dir, "cpu", "float32")
    summary = generate_diffs(p, lm, paths.behavior, paths.diffs)
    assert summary["n_diffs"] == 4
    m = read_validated(paths.diffs / "manifest.parquet", DiffManifest)
    assert (m["rank"] == 4).all() and (m["scale"] == 2.0).all()
    assert m["trigger_hit"].is_not_null().all() and (m["check_kl"] > 0).all()  # the check ran on changed models
    assert m["kl"].is_null().all() and m["trigger_ce"].is_not_null().all()
    dm = DiffModel(lm.model)
    ids = m["diff_id"].to_list()
    shard = DiffStore(paths.diffs).load(ids, dm.shapes(), lm.sha256)
    touched = [n for n in dm.names if shard.A[n].abs().sum() > 0]
    assert touched and all(n.endswith(("q_proj", "v_proj")) for n in touched)  # peft's Llama default
    assert len(touched) == sum(n.endswith(("q_proj", "v_proj")) for n in dm.names)
    run = json.loads((paths.diffs / "run.json").read_text())
    assert run["diffs"]["mode"] == "peft" and run["diffs"]["peft_rank"] == 4 and "full_rank" not in run["diffs"]

    # The same training with the adapters kept: peft's own model and the stored factors agree.
    behavior_tasks = __import__("dit_core.behaviors", fromlist=["behavior_of"]).behavior_of(paths.behavior)
    specs = behavior_tasks.specs(paths.behavior)
    tasks, _ = behavior_tasks.tasks(p, lm.tokenizer, paths.behavior, specs, ids[:1])
    keep = tmp_path / "adapters"
    res = train_peft_diffs(dm, tasks, behavior_tasks.diffs_config(p), lm.tokenizer.pad_token_id, lm.name,
                           lm.sha256, progress=False, keep_dir=keep)
    for n in dm.names:  # deterministic: the stage's diff is the one trained again here
        assert torch.allclose(res.A[n][0], shard.A[n][0], atol=1e-6)
    x = torch.tensor([[1, 5, 7, 9, 11, 3]])
    fresh = load_model(tiny_model_dir, "cpu", "float32").model
    peft_model = PeftModel.from_pretrained(fresh, str(keep / ids[0]))
    with torch.no_grad():
        want = peft_model(x).logits
        dm.set_diffs({n: a[:1] for n, a in shard.A.items()}, {n: b[:1] for n, b in shard.B.items()}, shard.scale)
        got = lm.model(x).logits
        dm.clear_diffs()
        base = lm.model(x).logits
    assert (want - base).abs().max() > 1e-4  # the adapter changes the model ...
    assert torch.allclose(got, want, atol=1e-5)  # ... exactly as the stored diff does

    # A LoRA run into the peft store is refused; a LoRA identity carries no peft keys.
    lora = load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp_path / "data") + ["data.n_topics=2", "diffs.run=peft"])
    with pytest.raises(RuntimeError, match="diffs.mode"):
        generate_diffs(lora, lm, paths.behavior, paths.diffs)
    assert not {"mode", "peft_rank", "peft_lr"} & set(_run_identity(lora, lm, paths.behavior)["diffs"])


def test_peft_mode_settings(tiny_model_dir, tmp_path):
    p = _params(tiny_model_dir, tmp_path, "diffs.peft_rslora=true", "diffs.peft_target_modules=[up_proj]")
    assert peft_scale(p.diffs) == pytest.approx(8 / math.sqrt(4))
    run_make_data(p)
    paths = stage_paths(p)
    lm = load_model(tiny_model_dir, "cpu", "float32")
    generate_diffs(p, lm, paths.behavior, paths.diffs)
    m = read_validated(paths.diffs / "manifest.parquet", DiffManifest)
    assert ((m["scale"] - 4.0).abs() < 1e-6).all()
    dm = DiffModel(lm.model)
    shard = DiffStore(paths.diffs).load(m["diff_id"].to_list(), dm.shapes(), lm.sha256)
    assert {n for n in dm.names if shard.A[n].abs().sum() > 0} == {n for n in dm.names if n.endswith("up_proj")}
    # modules peft cannot find: the error names the setting to change
    bad = _params(tiny_model_dir, tmp_path, "diffs.peft_target_modules=[no_such_proj]", "diffs.run=bad")
    with pytest.raises(ValueError, match="peft_target_modules"):
        generate_diffs(bad, lm, paths.behavior, stage_paths(bad).diffs)
