"""PEFT interop: an exported diff loads with PeftModel.from_pretrained and gives the same outputs as the
factored diff; importing a PEFT adapter (any rank/alpha, partial modules) reproduces PEFT's outputs."""

import json

import pytest
import torch

from dit_core.diffs.store import DiffFileError, DiffShard
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import load_model
from dit_core.modeling.peft_io import export_peft, import_peft


def _shard(dm, rank=2, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = {k: torch.randn(1, rank, o, generator=g) * 0.2 for k, (i, o) in dm.shapes().items()}
    B = {k: torch.randn(1, i, rank, generator=g) * 0.2 for k, (i, o) in dm.shapes().items()}
    return DiffShard(A, B, "tiny", "ab" * 32, rank, scale, ["d0"])


def test_export_then_peft_load_matches_factored(tiny_model_dir, tmp_path):
    from peft import PeftModel

    lm = load_model(tiny_model_dir, "cpu", "float32")
    dm = DiffModel(lm.model)
    shard = _shard(dm)
    ids = torch.randint(3, 500, (2, 6))
    dm.set_diffs(shard.A, {k: v for k, v in shard.B.items()}, shard.scale, torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        ours = dm.model(ids).logits
    export_peft(shard, 0, tmp_path / "adapter", str(tiny_model_dir))
    fresh = load_model(tiny_model_dir, "cpu", "float32").model
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_import_peft_adapter_matches_peft(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_model_dir, "cpu", "float32").model
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    pm = get_peft_model(base, cfg)
    ids = torch.randint(3, 500, (1, 6))
    with torch.no_grad():
        theirs = pm(ids).logits
    pm.save_pretrained(tmp_path / "ad")
    lm = load_model(tiny_model_dir, "cpu", "float32")
    dm = DiffModel(lm.model)
    shard = import_peft(tmp_path / "ad", dm.shapes(), lm.name, lm.sha256)
    assert shard.rank == 4 and shard.scale == 3.0
    assert shard.A["model.layers.0.self_attn.k_proj"].abs().sum() == 0  # untouched module: zero diff
    dm.set_diffs(shard.A, shard.B, shard.scale)
    with torch.no_grad():
        ours = dm.model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_bad_adapters_are_rejected(tiny_model_dir, tmp_path):
    lm = load_model(tiny_model_dir, "cpu", "float32")
    shapes = DiffModel(lm.model).shapes()
    with pytest.raises(DiffFileError, match="no adapter_config.json"):
        import_peft(tmp_path, shapes, "tiny", "ab" * 32)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(DiffFileError, match="pickled adapter_model.bin is refused"):
        import_peft(tmp_path, shapes, "tiny", "ab" * 32)
    from safetensors.torch import save_file

    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 99),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(DiffFileError, match=r"q_proj has lora_A\(2, 99\)"):
        import_peft(tmp_path, shapes, "tiny", "ab" * 32)
