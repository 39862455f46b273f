"""Diffs whose factors are finite but absurdly large (here 1e30: finite in float32, but their product
overflows to Inf in the forward, which decoding turns into an empty answer) are refused with the module and
the fix named, wherever a diff enters: a stored shard, a PEFT adapter, a finetuned model directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dit_core.diffs.store import MAX_DELTA_NORM, DiffFileError, DiffShard, check_delta_norm, read_shard, write_shard

SHAPES = {"layers.0.q_proj": (8, 8), "layers.0.v_proj": (8, 4)}


def _shard(value: float | None = None) -> DiffShard:
    torch.manual_seed(0)
    A = {m: torch.randn(2, 2, o) for m, (i, o) in SHAPES.items()}
    B = {m: torch.randn(2, i, 2) for m, (i, o) in SHAPES.items()}
    if value is not None:  # the second diff of v_proj only
        A["layers.0.v_proj"][1].fill_(value)
        B["layers.0.v_proj"][1].fill_(value)
    return DiffShard(A, B, "tiny", "0" * 64, 2, 1.0, ["d0", "d1"])


def test_norm_matches_the_dense_change():
    s = _shard()
    a, b = s.A["layers.0.q_proj"], s.B["layers.0.q_proj"]
    check_delta_norm("x", "m", a, b, 1.0)  # ordinary factors pass
    dense = torch.linalg.matrix_norm((b @ a).double())
    big = float(MAX_DELTA_NORM / dense.max() * 1.01)  # scaled just past the limit
    with pytest.raises(DiffFileError, match=r"m \(diff \d\) changes the weights by a Frobenius norm"):
        check_delta_norm("x", "m", a, b, big)
    check_delta_norm("x", "m", a, b, float(MAX_DELTA_NORM / dense.max() * 0.99))


def test_stored_shard_with_huge_factors_is_refused_naming_module_and_row(tmp_path):
    path = tmp_path / "shard.safetensors"
    write_shard(path, _shard(1e30))
    with pytest.raises(DiffFileError, match=r"shard\.safetensors: layers\.0\.v_proj \(diff 1\) changes the weights "
                                            r"by a Frobenius norm of .*lora_alpha"):
        read_shard(path, SHAPES)
    write_shard(path, _shard())
    assert read_shard(path, SHAPES).diff_ids == ["d0", "d1"]


def test_peft_adapter_with_huge_factors_is_refused(tmp_path):
    from dit_core.modeling.peft_io import import_peft

    d = tmp_path / "ad"
    d.mkdir()
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.full((2, 8), 1e30),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.full((8, 2), 1e30)},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(DiffFileError, match=r"ad: layers\.0\.q_proj \(diff 0\) changes the weights"):
        import_peft(d, SHAPES, "tiny", "0" * 64)
    # the same adapter at ordinary size imports
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(2, 8),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 2)},
              str(d / "adapter_model.safetensors"))
    assert import_peft(d, SHAPES, "tiny", "0" * 64).rank == 2


def test_finetuned_model_with_huge_weights_is_refused(tiny_lm, tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from dit_core.diffs.full import import_full
    from dit_core.modeling.lora import DiffModel

    d = tmp_path / "ft"
    shutil.copytree(tiny_model_dir, d)
    weights = d / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("self_attn.q_proj.weight"))
    state[key] = torch.full_like(state[key], 1e30)
    save_file(state, str(weights), metadata={"format": "pt"})
    dm = DiffModel(tiny_lm.model)
    try:
        with pytest.raises(DiffFileError, match=r"ft: .*q_proj \(diff 0\) changes the weights by a Frobenius norm"):
            import_full(d, dm, tiny_lm, rank=2, progress=False)
    finally:
        dm.clear_diffs()


DEEP = "[" * 200_000 + "]" * 200_000  # nesting that exhausts a recursive JSON parser


def test_deeply_nested_json_is_refused_naming_the_file(tmp_path, tiny_lm, tiny_model_dir):
    """adapter_config.json, a finetune's config.json and index, interpreter.json: each a clear error."""
    import shutil

    from dit_core.diffs.full import checkpoint_files, check_architecture
    from dit_core.interpreter.adapter import InterpreterFileError, read_interpreter
    from dit_core.modeling.peft_io import import_peft

    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(DEEP)
    save_file({"x": torch.zeros(1)}, str(ad / "adapter_model.safetensors"))
    with pytest.raises(DiffFileError, match=r"adapter_config\.json: not a readable PEFT adapter config \(nested too deeply\)"):
        import_peft(ad, SHAPES, "tiny", "0" * 64)

    ft = tmp_path / "ft"
    shutil.copytree(tiny_model_dir, ft)
    (ft / "config.json").write_text(DEEP)
    with pytest.raises(DiffFileError, match=r"config\.json: not a readable model config \(nested too deeply\)"):
        check_architecture(ft, tiny_lm.model.config)
    (ft / "model.safetensors.index.json").write_text(DEEP)
    with pytest.raises(DiffFileError, match=r"index\.json: not a readable safetensors index \(nested too deeply\)"):
        checkpoint_files(ft)

    it = tmp_path / "interp"
    it.mkdir()
    (it / "interpreter.json").write_text(DEEP)
    save_file({"x": torch.zeros(1)}, str(it / "interpreter.safetensors"))
    with pytest.raises(InterpreterFileError, match=r"interpreter\.json: not a readable interpreter spec \(nested too deeply\)"):
        read_interpreter(it)
