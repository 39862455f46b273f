"""Pickles are never unpickled: a pickle given as a diff file, a PEFT adapter's weights or an interpreter's
weights is refused, and the payload (which would create a file when unpickled) never runs."""

import json
import pickle

import pytest

from dit_core.diffs.store import DiffFileError, read_shard
from dit_core.interpreter.adapter import SPEC, WEIGHTS, InterpreterFileError, read_interpreter
from dit_core.modeling.peft_io import import_peft


class Payload:
    """Unpickling this creates the sentinel file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def _pickle(path, sentinel):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload(sentinel)))
    return path


@pytest.fixture()
def sentinel(tmp_path):
    s = tmp_path / "PWNED"
    yield s
    assert not s.exists(), "a pickle was unpickled"


def test_pickle_renamed_safetensors_is_refused_as_a_diff(tmp_path, sentinel):
    f = _pickle(tmp_path / "evil.safetensors", sentinel)
    with pytest.raises(DiffFileError, match=r"evil.safetensors: not a readable safetensors file"):
        read_shard(f)


def test_peft_adapter_with_pickled_weights_is_refused(tmp_path, sentinel):
    d = tmp_path / "adapter"
    _pickle(d / "adapter_model.bin", sentinel)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}))
    with pytest.raises(DiffFileError, match=r"pickled adapter_model.bin is refused"):
        import_peft(d, {}, "base", "0" * 64)
    _pickle(d / "adapter_model.safetensors", sentinel)  # a pickle under the safetensors name
    with pytest.raises(DiffFileError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        import_peft(d, {}, "base", "0" * 64)


def test_interpreter_with_pickled_weights_is_refused(tmp_path, sentinel):
    d = tmp_path / "interp"
    _pickle(d / WEIGHTS, sentinel)
    spec = {"kind": "lora", "question": "q", "rank": 1, "alpha": 1.0, "modules": ".*", "base_model": "b",
            "base_sha256": "0" * 64}
    (d / SPEC).write_text(json.dumps(spec))
    with pytest.raises(InterpreterFileError, match=r"interpreter.safetensors: unreadable"):
        read_interpreter(d)
    (d / SPEC).write_text(json.dumps({"kind": "lora"}))
    with pytest.raises(InterpreterFileError, match=r"interpreter.json: not an interpreter spec"):
        read_interpreter(d)


@pytest.mark.parametrize("name", ["diff.pt", "diff.bin", "diff.pkl"])
def test_pickle_suffixes_are_not_diffs(tiny_lm, tmp_path, sentinel, name):
    from dit_core.interpreter.describe import resolve_diffs
    from dit_core.modeling.lora import DiffModel

    f = _pickle(tmp_path / name, sentinel)
    with pytest.raises(FileNotFoundError, match=r"neither a PEFT adapter dir, .*a diff \.safetensors file"):
        resolve_diffs([str(f)], DiffModel(tiny_lm.model), tiny_lm)


def test_peft_adapter_for_another_base_model_is_refused(tmp_path):
    """Recorded base model, malformed config: each refused naming the file; --any-base accepts the first."""
    import json

    import torch
    from safetensors.torch import save_file

    from dit_core.diffs.store import DiffFileError
    from dit_core.modeling.peft_io import import_peft

    d = tmp_path / "ad"
    d.mkdir()
    shapes = {"layers.0.q_proj": (8, 8)}
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(2, 8),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 2)}, str(d / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "base_model_name_or_path": "SomeOrg/Other-7B"}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(DiffFileError, match=r"adapter_config\.json: the adapter was trained on base model "
                                            r"'SomeOrg/Other-7B', not the loaded 'smollm2-135m-instruct'.*--any-base"):
        import_peft(d, shapes, "smollm2-135m-instruct", "0" * 64)
    assert import_peft(d, shapes, "smollm2-135m-instruct", "0" * 64, any_base=True).rank == 2
    (d / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert import_peft(d, shapes, "smollm2-135m-instruct", "0" * 64).rank == 2  # the same model by its hub id
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(DiffFileError, match=r"adapter_config\.json: not a readable PEFT adapter config"):
        import_peft(d, shapes, "smollm2-135m-instruct", "0" * 64)
