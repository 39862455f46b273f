"""PEFT adapters as users have them, made by `peft` itself on the tiny model: rsLoRA, attention-only,
MLP-only, ranks above the training rank, alpha != rank, rank_pattern / alpha_pattern. Each imported
adapter, applied through DiffModel, gives PEFT's own logits; DoRA and other non-LoRA adapters are refused
naming what is supported and what was found; export -> import round trips."""

import json

import pytest
import torch

from dit_core.diffs.store import DiffFileError
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import load_model
from dit_core.modeling.peft_io import export_peft, import_peft

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(0))


def peft_adapter(model_dir, out, config, seed=0):
    """Save an adapter made by peft (lora_B randomised so it is non-zero); return (dir, PEFT's logits)."""
    from peft import get_peft_model

    base = load_model(model_dir, "cpu", "float32").model
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # peft's lora_A init: the same adapter whatever ran before
        pm = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in pm.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
        logits = pm(IDS).logits
    pm.save_pretrained(out)
    return out, logits


def our_logits(model_dir, shard):
    lm = load_model(model_dir, "cpu", "float32")
    dm = DiffModel(lm.model)
    dm.set_diffs(shard.A, shard.B, shard.scale, torch.zeros(IDS.shape[0], dtype=torch.long))
    with torch.no_grad():
        out = dm.model(IDS).logits
        with dm.diffs_disabled():
            base = dm.model(IDS).logits
    return out, base


def imported(model_dir, adapter):
    lm = load_model(model_dir, "cpu", "float32")
    return import_peft(adapter, DiffModel(lm.model).shapes(), lm.name, lm.sha256)


CASES = {
    # name: (LoraConfig kwargs, modules that must hold a diff, expected rank, expected scale)
    "rslora": (dict(r=4, lora_alpha=8, use_rslora=True), ATTENTION + MLP, 4, 8 / 2),
    "attention_only": (dict(r=2, lora_alpha=2, target_modules=ATTENTION), ATTENTION, 2, 1.0),
    "mlp_only": (dict(r=2, lora_alpha=4, target_modules=MLP), MLP, 2, 2.0),
    "rank16": (dict(r=16, lora_alpha=16), ATTENTION + MLP, 16, 1.0),
    "alpha_ne_rank": (dict(r=4, lora_alpha=1), ATTENTION + MLP, 4, 0.25),
    # per-module rank and alpha: scales differ, so they are folded into A (shard scale 1)
    "patterns": (dict(r=4, lora_alpha=4, rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
                      alpha_pattern={"v_proj": 12}), ATTENTION + MLP, 8, 1.0),
    "rslora_patterns": (dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"o_proj": 16}),
                        ATTENTION + MLP, 16, 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_made_adapter_imports_to_peft_logits(tiny_model_dir, tmp_path, case):
    from peft import LoraConfig

    kwargs, touched, rank, scale = CASES[case]
    kwargs = {"target_modules": ATTENTION + MLP, **kwargs}
    adapter, theirs = peft_adapter(tiny_model_dir, tmp_path / case, LoraConfig(**kwargs))
    shard = imported(tiny_model_dir, adapter)
    assert (shard.rank, shard.scale) == (rank, pytest.approx(scale))
    for m in shard.modules:
        carries = shard.A[m].abs().sum() > 0 and shard.B[m].abs().sum() > 0
        expect = m.rsplit(".", 1)[1] in touched
        assert carries == expect, m  # untouched modules: zero factors
        assert shard.A[m].shape[1] == shard.B[m].shape[2] == rank  # lower ranks zero-padded
    ours, base = our_logits(tiny_model_dir, shard)
    assert (theirs - base).abs().max() > 1e-2  # the adapter changes the model: the comparison means something
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # float32 sums in another order


@pytest.mark.parametrize("case", ["rslora", "patterns"])
def test_export_then_import_round_trip(tiny_model_dir, tmp_path, case):
    from peft import LoraConfig, PeftModel

    kwargs = {"target_modules": ATTENTION + MLP, **CASES[case][0]}
    adapter, theirs = peft_adapter(tiny_model_dir, tmp_path / "in", LoraConfig(**kwargs), seed=3)
    shard = imported(tiny_model_dir, adapter)
    export_peft(shard, 0, tmp_path / "out", str(tiny_model_dir))
    # PEFT loads the exported adapter and computes the original adapter's logits...
    pm = PeftModel.from_pretrained(load_model(tiny_model_dir, "cpu", "float32").model, tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(pm(IDS).logits, theirs, atol=1e-5, rtol=1e-4)
    # ...and importing it again gives the same diff.
    again = imported(tiny_model_dir, tmp_path / "out")
    assert (again.rank, again.scale) == (shard.rank, shard.scale)
    for m in shard.modules:
        torch.testing.assert_close(again.A[m], shard.A[m])
        torch.testing.assert_close(again.B[m], shard.B[m])


def test_dora_adapter_is_refused_with_what_is_supported(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    adapter, _ = peft_adapter(tiny_model_dir, tmp_path / "dora", LoraConfig(r=2, target_modules=ATTENTION,
                                                                           use_dora=True))
    with pytest.raises(DiffFileError, match=r"use_dora=True: DoRA .*supported: LoRA and rsLoRA adapters .*any "
                                            r"rank and alpha.*any subset of modules"):
        imported(tiny_model_dir, adapter)
    # the DoRA magnitude tensors alone (config edited to claim plain LoRA) are refused too
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(DiffFileError, match=r"not LoRA factors, e\.g\. .*lora_magnitude_vector"):
        imported(tiny_model_dir, adapter)


def _peft_config(kind):
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PromptTuningConfig

    return {
        "ia3": (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                r"peft_type='IA3' is not a LoRA adapter"),
        "loha": (LoHaConfig(r=2, target_modules=ATTENTION), r"peft_type='LOHA' is not a LoRA adapter"),
        "lokr": (LoKrConfig(r=2, target_modules=ATTENTION), r"peft_type='LOKR' is not a LoRA adapter"),
        "prompt_tuning": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                          r"peft_type='PROMPT_TUNING' is not a LoRA adapter"),
        "bias": (LoraConfig(r=2, target_modules=ATTENTION, bias="lora_only"), r"bias='lora_only': trained biases"),
        "lora_bias": (LoraConfig(r=2, target_modules=ATTENTION, lora_bias=True), r"lora_bias=True"),
        "modules_to_save": (LoraConfig(r=2, target_modules=ATTENTION, modules_to_save=["lm_head"]),
                            r"modules_to_save=\['lm_head'\]"),
        "embedding": (LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]), r"embedding-layer LoRA"),
    }[kind]


@pytest.mark.parametrize("kind", ["ia3", "loha", "lokr", "prompt_tuning", "bias", "lora_bias", "modules_to_save",
                                  "embedding"])
def test_other_adapters_are_refused_naming_what_was_found(tiny_model_dir, tmp_path, kind):
    config, found = _peft_config(kind)
    adapter, _ = peft_adapter(tiny_model_dir, tmp_path / kind, config)
    with pytest.raises(DiffFileError, match=found + r".*supported: LoRA and rsLoRA"):
        imported(tiny_model_dir, adapter)


def test_base_changing_initialisation_is_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    adapter, _ = peft_adapter(tiny_model_dir, tmp_path / "pissa", LoraConfig(r=2, target_modules=ATTENTION,
                                                                            init_lora_weights="pissa"))
    with pytest.raises(DiffFileError, match=r"init_lora_weights='pissa' changes the base weights.*"
                                            r"path_initial_model_for_weight_conversion"):
        imported(tiny_model_dir, adapter)


def test_lm_head_lora_and_bad_configs_are_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    adapter, _ = peft_adapter(tiny_model_dir, tmp_path / "head", LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(DiffFileError, match=r"not among the base model's wrapped decoder linear layers.*lm_head"):
        imported(tiny_model_dir, adapter)
    adapter, _ = peft_adapter(tiny_model_dir, tmp_path / "ok", LoraConfig(r=2, target_modules=ATTENTION))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 0}}))
    with pytest.raises(DiffFileError, match=r"ranks must be >= 1.*q_proj=0"):
        imported(tiny_model_dir, adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 3}}))
    with pytest.raises(DiffFileError, match=r"q_proj has lora_A\(2, 32\).*expected lora_A\(3, 32\).*rank_pattern"):
        imported(tiny_model_dir, adapter)


def test_cli_import_peft_writes_the_diff_and_refuses_dora(tiny_model_dir, tmp_path):
    from peft import LoraConfig
    from typer.testing import CliRunner

    from conftest import PARAMS, section
    from dit_core.diffs.store import read_shard
    from dit_core.modeling.models import fetch_model
    from flows.cli import app

    fetch_model(section("model", source="local", id=str(tiny_model_dir)), tmp_path / "data" / "models")
    args = ["--params", str(PARAMS), "--set", "model.source=local", "--set", f"model.id={tiny_model_dir}",
            "--set", f"paths.data={tmp_path / 'data'}", "--set", "model.device=cpu"]
    adapter, theirs = peft_adapter(tiny_model_dir, tmp_path / "mlp", LoraConfig(r=8, lora_alpha=4, target_modules=MLP))
    res = CliRunner().invoke(app, ["import-peft", str(adapter), str(tmp_path / "mlp.safetensors"), *args])
    assert res.exit_code == 0, res.output
    assert "rank 8, scale 0.5, 6 of 14 modules hold the adapter" in res.output
    lm = load_model(tiny_model_dir, "cpu", "float32")
    shard = read_shard(tmp_path / "mlp.safetensors", DiffModel(lm.model).shapes(), lm.sha256)
    torch.testing.assert_close(our_logits(tiny_model_dir, shard)[0], theirs, atol=1e-5, rtol=1e-4)
    dora, _ = peft_adapter(tiny_model_dir, tmp_path / "dora", LoraConfig(r=2, target_modules=MLP, use_dora=True))
    res = CliRunner().invoke(app, ["import-peft", str(dora), str(tmp_path / "dora.safetensors"), *args])
    assert res.exit_code != 0 and "use_dora=True: DoRA" in res.output
    assert not (tmp_path / "dora.safetensors").exists()
