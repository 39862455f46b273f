"""Corruption is detected before use: a flipped byte in a stored shard is refused on read with the file
named, and `dit verify` reports every problem of a store, a dataset and an interpreter folder."""

import pytest
from typer.testing import CliRunner

from dit_core.diffs.store import DiffFileError, DiffStore
from dit_core.verify import verify


def _flip(path, at=-9):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def toy(tiny_model_dir, tmp_path):
    from dit_core.modeling.models import load_model
    from test_interpreter import make_toy_store

    lm = load_model(tiny_model_dir, "cpu", "float32")
    make_toy_store(tmp_path / "diffs", lm)
    return tmp_path / "diffs"


def test_flipped_byte_in_a_shard_is_refused_before_use(toy):
    store = DiffStore(toy)
    ids = store.manifest()["diff_id"].to_list()[:2]
    store.load(ids)  # intact: loads
    shard = toy / store.manifest()["shard"][0]
    _flip(shard)
    with pytest.raises(DiffFileError, match=rf"{shard.name}: sha256 .* is not the .* recorded"):
        store.load(ids)


def test_verify_reports_every_problem(toy, tmp_path):
    import shutil

    from flows.cli import app

    ok = verify(toy)
    assert ok["kind"] == "diff store" and ok["problems"] == [] and ok["checked"]["shards"] >= 1
    other = tmp_path / "other"
    shutil.copytree(toy, other)
    shard = sorted(toy.glob("shard-*.safetensors"))[0]
    _flip(shard)
    (other / shard.name).unlink()
    bad = verify(toy)
    assert len(bad["problems"]) == 1 and shard.name in bad["problems"][0] and "sha256" in bad["problems"][0]
    assert "missing" in verify(other)["problems"][0]

    res = CliRunner().invoke(app, ["verify", str(toy), str(other), str(tmp_path / "nothing-here")])
    assert res.exit_code == 1
    assert res.output.count("1 problem(s)") == 3 and "unknown" in res.output


def test_verify_interpreter_folder(tmp_path):
    import json

    from safetensors.torch import save_file
    import torch

    d = tmp_path / "interp"
    d.mkdir()
    spec = {"kind": "lora", "question": "q", "rank": 1, "alpha": 1.0, "modules": ".*", "base_model": "b",
            "base_sha256": "0" * 64}
    (d / "interpreter.json").write_text(json.dumps(spec))
    save_file({"w": torch.ones(2)}, str(d / "interpreter.safetensors"))
    assert verify(d)["problems"] == []
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(d / "interpreter.safetensors"))
    assert any("NaN" in p or "nan" in p.lower() for p in verify(d)["problems"])


def test_verify_reports_a_malformed_manifest(toy, tmp_path):
    """A manifest missing columns, one with duplicate ids, and one that is not parquet at all: each a
    problem named by file (before, the first passed as an empty store and the last was a traceback)."""
    import shutil

    import polars as pl

    cases = {}
    for name in ("columns", "duplicates", "garbage"):
        cases[name] = tmp_path / name
        shutil.copytree(toy, cases[name])
    m = pl.read_parquet(toy / "manifest.parquet")
    m.drop("shard", "label").write_parquet(cases["columns"] / "manifest.parquet")
    pl.concat([m, m.head(1)]).write_parquet(cases["duplicates"] / "manifest.parquet")
    (cases["garbage"] / "manifest.parquet").write_bytes(b"PAR1 not a parquet file")
    got = {name: verify(path)["problems"] for name, path in cases.items()}
    assert len(got["columns"]) == 1 and "missing columns ['shard', 'label']" in got["columns"][0]
    assert "manifest.parquet does not match schema" in got["duplicates"][0] and "diff_id" in got["duplicates"][0]
    assert len(got["garbage"]) == 1 and "manifest.parquet: cannot read parquet" in got["garbage"][0]


def test_exported_adapter_records_its_sha256_and_a_flipped_byte_is_refused(toy, tmp_path, tiny_model_dir):
    """`dit export-peft` writes dit_export.json with the weights' sha256: `dit verify` and `import_peft`
    refuse the adapter once a byte of its weights changed (an adapter from elsewhere has no record: parsed
    and checked for NaN/Inf only)."""
    from dit_core.modeling.peft_io import EXPORT_RECORD, export_peft, import_peft

    store = DiffStore(toy)
    shard = store.load(store.manifest()["diff_id"].to_list()[:1])
    out = export_peft(shard, 0, tmp_path / "exported", str(tiny_model_dir))
    assert (out / EXPORT_RECORD).is_file()
    report = verify(out)
    assert report["kind"] == "PEFT adapter" and report["problems"] == [] and report["checked"]["tensors"] > 0
    shapes = {m: (shard.B[m].shape[1], shard.A[m].shape[2]) for m in shard.modules}
    import_peft(out, shapes, shard.base_model, shard.base_sha256)  # intact: imports
    _flip(out / "adapter_model.safetensors")
    report = verify(out)
    assert len(report["problems"]) == 1 and "sha256" in report["problems"][0], report
    with pytest.raises(DiffFileError, match=r"adapter_model\.safetensors: sha256 .* recorded .*dit export-peft"):
        import_peft(out, shapes, shard.base_model, shard.base_sha256)
    (out / EXPORT_RECORD).unlink()  # no record: parsed; the flipped byte sits in the data, still finite or not
    assert verify(out)["kind"] == "PEFT adapter"
