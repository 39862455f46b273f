"""Stored diffs round-trip bit-exactly; bad files fail with errors that name the problem."""

import pytest
import torch
from safetensors.torch import save_file

from dit_core.diffs.store import DiffFileError, DiffShard, read_shard, write_shard

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.mlp.down_proj": (16, 8)}
SHA = "ab" * 32


def _shard(T=3, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = {k: torch.randn(T, r, o, generator=g) for k, (i, o) in SHAPES.items()}
    B = {k: torch.randn(T, i, r, generator=g) for k, (i, o) in SHAPES.items()}
    return DiffShard(A, B, "tiny", SHA, r, 0.5, [f"d{t}" for t in range(T)])


def test_round_trip_is_bit_exact(tmp_path):
    s = _shard()
    sha = write_shard(tmp_path / "s.safetensors", s)
    assert len(sha) == 64
    back = read_shard(tmp_path / "s.safetensors", SHAPES, SHA)
    assert back.diff_ids == s.diff_ids and back.rank == 2 and back.scale == 0.5
    for k in SHAPES:
        assert torch.equal(back.A[k], s.A[k]) and torch.equal(back.B[k], s.B[k])
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file


def test_wrong_shapes_are_rejected(tmp_path):
    write_shard(tmp_path / "s.safetensors", _shard())
    wrong = dict(SHAPES)
    wrong["model.layers.0.mlp.down_proj"] = (32, 8)
    with pytest.raises(DiffFileError, match=r"down_proj has A\(3, 2, 8\) B\(3, 16, 2\), expected"):
        read_shard(tmp_path / "s.safetensors", wrong)


def test_module_names_checked_against_base_model(tmp_path):
    write_shard(tmp_path / "s.safetensors", _shard())
    other = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.9.mlp.up_proj": (8, 16)}
    with pytest.raises(DiffFileError, match="module names do not match"):
        read_shard(tmp_path / "s.safetensors", other)


def test_nan_is_rejected(tmp_path):
    s = _shard()
    s.A["model.layers.0.self_attn.q_proj"][1, 0, 0] = float("nan")
    write_shard(tmp_path / "s.safetensors", s)
    with pytest.raises(DiffFileError, match="NaN or Inf"):
        read_shard(tmp_path / "s.safetensors", SHAPES)


def test_other_base_model_is_rejected(tmp_path):
    write_shard(tmp_path / "s.safetensors", _shard())
    with pytest.raises(DiffFileError, match="made for base model tiny"):
        read_shard(tmp_path / "s.safetensors", SHAPES, "cd" * 32)


def test_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DiffFileError, match="not a readable safetensors file"):
        read_shard(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(DiffFileError, match="format=None"):
        read_shard(foreign)
    with pytest.raises(DiffFileError, match="not found"):
        read_shard(tmp_path / "missing.safetensors")


def test_compare_record_names_what_changed(tmp_path):
    from dit_core.io import compare_record, move_aside, write_json_atomic

    rec = tmp_path / "made_with.json"
    assert compare_record(rec, {"a": 1}) is None
    write_json_atomic(rec, {"data": {"n": 1, "seed": 0}, "model": "m"})
    assert compare_record(rec, {"data": {"n": 1, "seed": 0}, "model": "m"}) == []
    assert compare_record(rec, {"data": {"n": 2, "seed": 0}, "model": "x"}) == ["data.n", "model"]
    rec.write_text("{not json")
    assert compare_record(rec, {"a": 1}) == ["(unreadable record)"]
    stale = move_aside(rec)
    assert not rec.exists() and stale.name.startswith("made_with.json.stale-")
