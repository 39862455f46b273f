"""Malformed and hostile safetensors diff files are refused with a message naming the file (and the tensor
or key where there is one), before anything large is allocated."""

from __future__ import annotations

import json
import resource
import struct

import pytest
import torch

from dit_core.diffs.store import DiffFileError, DiffShard, read_shard, write_shard

EXPECTED = {"layers.0.q_proj": (8, 8), "layers.0.v_proj": (8, 4)}
META = {"format": "dit-diff/1", "modules": json.dumps(list(EXPECTED)), "diff_ids": json.dumps(["d0"]),
        "rank": "1", "scale": "1.0", "base_model": "tiny", "base_sha256": "0" * 64}


def _good(path, **changes):
    A = {m: torch.randn(1, 1, o) for m, (i, o) in EXPECTED.items()}
    B = {m: torch.randn(1, i, 1) for m, (i, o) in EXPECTED.items()}
    for key, value in changes.items():
        (A if key.endswith(".A") else B)[key.rsplit(".", 1)[0]] = value
    write_shard(path, DiffShard(A, B, "tiny", "0" * 64, 1, 1.0, ["d0"]))
    return path


def _raw(path, header: dict, data: bytes = b"\0" * 64):
    """A file in the safetensors layout (8-byte header length, JSON header, data) with any header."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_intact_file_reads(tmp_path):
    assert read_shard(_good(tmp_path / "ok.safetensors"), EXPECTED).diff_ids == ["d0"]


def test_header_claiming_a_trillion_elements_is_refused_without_allocating(tmp_path):
    path = _raw(tmp_path / "huge.safetensors", {"__metadata__": META, "layers.0.q_proj.A": {
        "dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 64]}})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DiffFileError, match=r"huge\.safetensors: not a readable safetensors file"):
        read_shard(path, EXPECTED)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no 4 TB buffer, not even 200 MB


def test_overlapping_offsets_are_refused(tmp_path):
    t = {"dtype": "F32", "shape": [1, 1, 8]}
    path = _raw(tmp_path / "overlap.safetensors", {"__metadata__": META, "layers.0.q_proj.A": t | {"data_offsets": [0, 32]},
                                                   "layers.0.q_proj.B": t | {"data_offsets": [16, 48]}})
    with pytest.raises(DiffFileError, match=r"overlap\.safetensors: not a readable safetensors file"):
        read_shard(path, EXPECTED)


def test_header_longer_than_the_file_is_refused(tmp_path):
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(DiffFileError, match=r"liar\.safetensors: not a readable safetensors file"):
        read_shard(path, EXPECTED)


def test_truncated_file_is_refused(tmp_path):
    path = _good(tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(DiffFileError, match=r"cut\.safetensors: not a readable safetensors file"):
        read_shard(path, EXPECTED)


def test_wrong_shape_names_the_tensor_and_what_was_expected(tmp_path):
    path = _good(tmp_path / "shape.safetensors", **{"layers.0.v_proj.A": torch.randn(1, 1, 5)})
    with pytest.raises(DiffFileError, match=r"layers\.0\.v_proj has A\(1, 1, 5\).*expected A\(1, 1, 4\)"):
        read_shard(path, EXPECTED)


def test_non_float_dtype_is_refused(tmp_path):
    A = {m: torch.ones(1, 1, o, dtype=torch.int32) for m, (i, o) in EXPECTED.items()}
    B = {m: torch.ones(1, i, 1, dtype=torch.int32) for m, (i, o) in EXPECTED.items()}
    from safetensors.torch import save_file

    path = tmp_path / "ints.safetensors"
    save_file({**{f"{m}.A": v for m, v in A.items()}, **{f"{m}.B": v for m, v in B.items()}}, str(path), metadata=META)
    with pytest.raises(DiffFileError, match=r"layers\.0\.q_proj has dtype torch\.int32; expected a float type"):
        read_shard(path, EXPECTED)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_is_refused(tmp_path, bad):
    t = torch.randn(1, 8, 1)
    t[0, 3, 0] = bad
    path = _good(tmp_path / "nan.safetensors", **{"layers.0.q_proj.B": t})
    with pytest.raises(DiffFileError, match=r"layers\.0\.q_proj contains NaN or Inf"):
        read_shard(path, EXPECTED)


def test_unknown_module_names_are_refused(tmp_path):
    path = _good(tmp_path / "mods.safetensors")
    other = {"layers.0.q_proj": (8, 8), "layers.0.k_proj": (8, 4)}
    with pytest.raises(DiffFileError, match=r"module names do not match.*unknown: \['layers\.0\.v_proj'\].*"
                                            r"missing: \['layers\.0\.k_proj'\]"):
        read_shard(path, other)


@pytest.mark.parametrize("drop", ["modules", "rank", "base_sha256"])
def test_incomplete_metadata_names_the_key(tmp_path, drop):
    from safetensors.torch import save_file

    path = tmp_path / "meta.safetensors"
    save_file({"layers.0.q_proj.A": torch.ones(1, 1, 8)}, str(path), metadata={k: v for k, v in META.items() if k != drop})
    with pytest.raises(DiffFileError, match=rf"meta\.safetensors: metadata is incomplete or malformed \(KeyError: '{drop}'\)"):
        read_shard(path, EXPECTED)


def test_another_base_model_is_refused(tmp_path):
    path = _good(tmp_path / "base.safetensors")
    with pytest.raises(DiffFileError, match=r"made for base model tiny .*not this one"):
        read_shard(path, EXPECTED, base_sha256="f" * 64)


@pytest.mark.parametrize("shard", ["../../elsewhere/shard-00000.safetensors", "/etc/shard.safetensors",
                                   "sub/shard-00000.safetensors", ".hidden.safetensors", "shard-00000.pt"])
def test_manifest_shard_names_cannot_leave_the_store(tmp_path, shard):
    """A manifest row naming a shard outside its folder (or not a safetensors file) fails validation."""
    import polars as pl

    from dit_core.data.schemas import DiffManifest, ManifestError, with_optional_columns, validate

    row = dict(diff_id="d0", shard=shard, row=0, behavior="hidden_topic", category="c", label="l", trigger="123",
               rank=1, scale=1.0, base_model="tiny", base_sha256="0" * 64, train_loss=None, trigger_ce=None, kl=None,
               trigger_hit=None, wrong_prefix_hit=None, no_trigger_hit=None, check_kl=None, shard_sha256="0" * 64,
               split="none")
    ok = with_optional_columns(pl.DataFrame([row | {"shard": "shard-00000.safetensors"}]), DiffManifest)
    assert validate(ok, DiffManifest).height == 1
    with pytest.raises(ManifestError, match=r"shard"):
        validate(with_optional_columns(pl.DataFrame([row]), DiffManifest), DiffManifest, "manifest.parquet")


def test_a_shard_symlinked_outside_the_store_is_refused(tmp_path):
    """A store whose shard is a symlink to a file outside its folder (a plain, valid name in the
    manifest): the store, the diff bank and `dit verify` refuse it, naming the link and where it leads."""
    import polars as pl

    from dit_core.diffs.bank import DiffBank
    from dit_core.diffs.store import DiffStore, store_file
    from dit_core.verify import verify

    store = DiffStore(tmp_path / "store")
    store.root.mkdir()
    A = {m: torch.randn(1, 1, o) for m, (i, o) in EXPECTED.items()}
    B = {m: torch.randn(1, i, 1) for m, (i, o) in EXPECTED.items()}
    row = dict(diff_id="d0", row=0, behavior="hidden_topic", category="c", label="l", trigger="123", rank=1,
               scale=1.0, base_model="tiny", base_sha256="0" * 64, split="none")
    store.add_shard(0, DiffShard(A, B, "tiny", "0" * 64, 1, 1.0, ["d0"]), [row])
    store.write_manifest(1)
    assert store.load(["d0"], EXPECTED).diff_ids == ["d0"]  # the plain store reads

    outside = tmp_path / "elsewhere" / "secret.safetensors"
    outside.parent.mkdir()
    store.shard_path(0).rename(outside)  # same bytes (the recorded sha256 still matches), now outside
    store.shard_path(0).symlink_to(outside)
    for read in (lambda: store.load(["d0"], EXPECTED),
                 lambda: DiffBank(store.manifest().with_columns(store=pl.lit(str(store.root))), EXPECTED)):
        with pytest.raises(DiffFileError, match=r"shard-00000\.safetensors: leads \(through a symlink\) to "
                                                r".*elsewhere/secret\.safetensors, outside the store"):
            read()
    problems = verify(store.root)["problems"]
    assert len(problems) == 1 and "outside the store" in problems[0]

    # a symlink that stays inside the store is an ordinary file of it; a link to the folder's parent is not
    store.shard_path(0).unlink()
    outside.rename(store.root / "real.safetensors")
    store.shard_path(0).symlink_to(store.root / "real.safetensors")
    assert store.load(["d0"], EXPECTED).diff_ids == ["d0"] and verify(store.root)["problems"] == []
    for name in ("..", ".", "", "a/b.safetensors"):
        with pytest.raises(DiffFileError, match="not a file name in the store's folder"):
            store_file(store.root, name)
