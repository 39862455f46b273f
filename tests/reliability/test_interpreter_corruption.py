"""A flipped byte in an interpreter's weights or in a training checkpoint is refused before it is used,
with a message naming the file (sha256 recorded when it was written)."""

from __future__ import annotations

import pytest

from test_interpreter import toy  # noqa: F401  (fixture)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data: the file still parses, only its hash tells
    path.write_bytes(bytes(data))


def test_flipped_byte_in_interpreter_weights_is_refused(toy):  # noqa: F811
    from dit_core.interpreter.adapter import InterpreterFileError, read_interpreter
    from dit_core.interpreter.training import InterpreterRecipe
    from dit_core.verify import verify

    p, lm, tmp, _ = toy
    short = p.model_copy(update={"interpreter": p.interpreter.model_copy(update={"epochs": 1})})
    InterpreterRecipe(short, lm, tmp / "ds", tmp / "interp", progress=False).run()
    read_interpreter(tmp / "interp")  # intact: reads
    weights = tmp / "interp" / "interpreter.safetensors"
    _flip_last_byte(weights)
    with pytest.raises(InterpreterFileError, match=r"interpreter\.safetensors: sha256 .* recorded when it was written"):
        read_interpreter(tmp / "interp")
    problems = verify(tmp / "interp")["problems"]
    assert len(problems) == 1 and "sha256" in problems[0] and str(weights) in problems[0]


@pytest.mark.parametrize("kind", ["last", "optimizer"])
def test_flipped_byte_in_a_checkpoint_stops_the_resume(toy, kind):  # noqa: F811
    import json

    from dit_core.interpreter.adapter import InterpreterFileError
    from dit_core.interpreter.training import InterpreterRecipe

    p, lm, tmp, _ = toy
    short = p.model_copy(update={"interpreter": p.interpreter.model_copy(update={"epochs": 1})})
    InterpreterRecipe(short, lm, tmp / "ds", tmp / "interp", progress=False).run()
    state = json.loads((tmp / "interp" / "checkpoints" / "state.json").read_text())
    name = state["files"][kind]
    assert name == f"{kind}-0001.safetensors" and name in state["sha256"]
    ckpt = tmp / "interp" / "checkpoints" / name
    _flip_last_byte(ckpt)
    longer = p.model_copy(update={"interpreter": p.interpreter.model_copy(update={"epochs": 2})})
    with pytest.raises(InterpreterFileError, match=rf"{name}: sha256 .* delete .*checkpoints to train from scratch"):
        InterpreterRecipe(longer, lm, tmp / "ds", tmp / "interp", progress=False).run()
