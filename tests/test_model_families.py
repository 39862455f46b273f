"""The base-model families of the paper, built tiny from their own transformers configs (Llama, Qwen3,
Gemma 3 text): load, diff generation through the real trainer, interpreter training, describe (also of a
rank-64 PEFT adapter with an interpreter trained on rank-1 diffs) and PEFT import/export at PEFT's logits.
A model the trainer cannot wrap (GPT-2's Conv1D layers) is refused naming what was expected and found."""

import polars as pl
import pytest
import torch

from conftest import PARAMS, pipeline_overrides
from dit_core.config import load_params
from dit_core.diffs.generate import generate_diffs
from dit_core.diffs.store import DiffStore
from dit_core.interpreter.describe import describe
from dit_core.interpreter.training import InterpreterRecipe
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import load_model
from dit_core.modeling.peft_io import export_peft, import_peft
from dit_core.stages import dataset_dir, run_assemble, run_make_data, stage_paths
from dit_core.testing.tiny import FAMILIES, make_tiny_model_dir

CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
IDS = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(0))


def rank64_adapter(model_dir, shard, out, seed=0):
    """A rank-64 PEFT adapter (made by peft) whose delta_W equals the rank-1 diff `shard`: the factors padded
    with 63 components that cancel (zero rows of A against random columns of B) and mixed by a random
    orthogonal 64x64 matrix, so every entry is dense."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    pm = get_peft_model(load_model(model_dir, "cpu", "float32").model,
                        LoraConfig(r=64, lora_alpha=64 * shard.scale, target_modules=list(shard.modules)))
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for m in shard.modules:
            a, b = shard.A[m][0], shard.B[m][0]  # (1, out), (in, 1)
            b64 = torch.cat([b, torch.randn(b.shape[0], 63, generator=g)], 1)
            a64 = torch.cat([a, torch.zeros(63, a.shape[1])], 0)
            q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
            params[f"base_model.model.{m}.lora_A.default.weight"].copy_((b64 @ q).T)
            params[f"base_model.model.{m}.lora_B.default.weight"].copy_((q.T @ a64).T)
    pm.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_the_whole_pipeline(tmp_path, family):
    from peft import LoraConfig, PeftModel, get_peft_model

    model_dir = make_tiny_model_dir(tmp_path / f"tiny-{family}", family=family)
    lm = load_model(model_dir, "cpu", "float32")
    assert type(lm.model).__name__ == CLASSES[family]

    # diffs through the real trainer (6 diffs, 3 steps, one shard)
    p = load_params(PARAMS, pipeline_overrides(model_dir, tmp_path) + [
        "diffs.diffs_per_batch=6", "interpreter.epochs=2", "interpreter.lr=0.01"])
    run_make_data(p)
    paths = stage_paths(p)
    stats = generate_diffs(p, lm, paths.behavior, paths.diffs)
    assert stats["n_diffs"] == 6
    manifest = DiffStore(paths.diffs).manifest()
    assert manifest["train_loss"].is_finite().all() and (manifest["rank"] == 1).all()
    shard = DiffStore(paths.diffs).load(manifest["diff_id"].to_list())
    assert all(shard.A[m].abs().sum() > 0 for m in shard.modules)  # every module was trained

    # interpreter on those diffs
    run_assemble(p)
    summary = InterpreterRecipe(p, load_model(model_dir, "cpu", "float32"), dataset_dir(p), tmp_path / "interp",
                                progress=False).run()
    curve = pl.read_csv(tmp_path / "interp" / "train_log.csv")
    assert summary["epoch"] == 2 and curve.height == 2 and curve["train_loss"].is_finite().all()

    # describe a stored rank-1 diff and the same diff as a rank-64 PEFT adapter: the same answer
    diff_id = manifest["diff_id"][0]
    one = DiffStore(paths.diffs).load([diff_id])
    adapter = rank64_adapter(model_dir, one, tmp_path / "rank64")
    out = describe(load_model(model_dir, "cpu", "float32"), tmp_path / "interp", [diff_id, str(adapter)],
                   [paths.diffs], max_new_tokens=6)
    assert out["diff"].to_list() == [diff_id, str(adapter)]
    assert out["description"][0] == out["description"][1]
    assert out["confidence"].is_not_null().all() and out["best_label"][0] == out["best_label"][1]
    assert out["confidence"][0] == pytest.approx(out["confidence"][1], abs=1e-5)
    assert out["margin"][0] == pytest.approx(out["margin"][1], abs=1e-5)

    # PEFT import: an adapter made by peft on this family gives PEFT's logits through DiffModel
    pm = get_peft_model(load_model(model_dir, "cpu", "float32").model,
                        LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                   target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    with torch.no_grad():
        for name, prm in pm.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        theirs = pm(IDS).logits
    pm.save_pretrained(tmp_path / "peft")
    fresh = load_model(model_dir, "cpu", "float32")
    dm = DiffModel(fresh.model)
    imported = import_peft(tmp_path / "peft", dm.shapes(), fresh.name, fresh.sha256)
    dm.set_diffs(imported.A, imported.B, imported.scale, torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        ours = dm.model(IDS).logits
        with dm.diffs_disabled():
            assert (dm.model(IDS).logits - theirs).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)

    # PEFT export: a trained diff loads with PeftModel.from_pretrained at the factored diff's logits
    dm.set_diffs(one.A, one.B, one.scale, torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        ours = dm.model(IDS).logits
    export_peft(one, 0, tmp_path / "exported", str(model_dir))
    exported = PeftModel.from_pretrained(load_model(model_dir, "cpu", "float32").model, tmp_path / "exported")
    with torch.no_grad():
        torch.testing.assert_close(exported(IDS).logits, ours, atol=1e-5, rtol=1e-4)


def test_a_model_the_trainer_cannot_wrap_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no layer diffs can be trained on: expected "
                                         r"torch\.nn\.Linear .*found 8 Conv1D \(e\.g\. transformer\.h\.0\.attn"):
        DiffModel(gpt2)


def test_a_pattern_matching_no_layer_names_the_layers(tiny_lm):
    with pytest.raises(ValueError, match=r"diffs.modules='c_attn' matches none of the 14 linear layers of "
                                         r"LlamaForCausalLM's decoder \(e\.g\. model\.layers\.0\.self_attn\.q_proj"):
        DiffModel(tiny_lm.model, "c_attn")


def test_multimodal_gemma3_keeps_diffs_on_the_language_model():
    """gemma-3-4b-it loads as Gemma3ForConditionalGeneration: diffs.modules=language_model (docs/models.md)
    leaves out the vision tower's linear layers, which ".*" would also wrap."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    cfg = Gemma3Config(text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, image_size=28, patch_size=14), mm_tokens_per_image=4)
    model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    everything, text = DiffModel(model).names, DiffModel(model, "language_model").names
    assert any("vision_tower" in n for n in everything)
    assert len(text) == 14 and all(n.startswith("model.language_model.layers.") for n in text)
