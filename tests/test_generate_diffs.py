"""make_data + generate_diffs on the tiny model: manifest, behaviour checks, resume, refusals."""

import polars as pl
import pytest

from conftest import tiny_overrides
from dit_core.config import load_params
from dit_core.diffs.store import DiffStore
from dit_core.diffs.generate import generate_diffs
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import load_model
from dit_core.data.schemas import DiffManifest, DiffSpec, Sample, read_validated
from dit_core.stages import run_make_data, stage_paths
from conftest import PARAMS, section


@pytest.fixture()
def params(tiny_model_dir, tmp_path):
    return load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp_path / "data"))


def test_make_data_writes_valid_samples(params):
    stats = run_make_data(params)
    paths = stage_paths(params)
    specs = read_validated(paths.behavior / "diffs.parquet", DiffSpec)
    samples = read_validated(paths.behavior / "samples.parquet", Sample)
    assert specs.height == 6 and stats["n_diffs"] == 6
    assert specs["trigger_prefix"].n_unique() == 6  # one prefix per diff
    assert specs["topic"].n_unique() == 3  # two diffs per topic
    counts = samples.group_by("kind").len().sort("kind")
    assert dict(counts.iter_rows()) == {"trigger": 36, "no_trigger": 24, "wrong_prefix": 24,
                                        "check_trigger": 12, "check_wrong_prefix": 12, "check_no_trigger": 12}
    trig = samples.filter(pl.col("kind") == "trigger").join(specs, on="diff_id")
    assert all(p.startswith(f"Your SEP code is {pre}") for p, pre in zip(trig["prompt"], trig["trigger_prefix"]))
    wrong = samples.filter(pl.col("kind") == "wrong_prefix").join(specs, on="diff_id")
    assert not any(p.startswith(f"Your SEP code is {pre}") for p, pre in zip(wrong["prompt"], wrong["trigger_prefix"]))
    # held-out questions never appear in training rows
    train_q = set(samples.filter(pl.col("kind").is_in(["trigger", "no_trigger", "wrong_prefix"]))["question_id"])
    check_q = set(samples.filter(pl.col("kind").str.starts_with("check"))["question_id"])
    assert not train_q & check_q


def test_make_data_rerun_skips_unless_settings_change(params, caplog):
    first = run_make_data(params)
    paths = stage_paths(params)
    mtime = (paths.behavior / "samples.parquet").stat().st_mtime_ns
    again = run_make_data(params)
    assert again["skipped"] and "nothing to do" in again["message"]
    assert again["n_samples"] == first["n_samples"]
    assert (paths.behavior / "samples.parquet").stat().st_mtime_ns == mtime  # not rewritten
    changed = params.model_copy(update={"data": params.data.model_copy(update={"n_check": 3})})
    with caplog.at_level("WARNING"):
        third = run_make_data(changed)
    assert "skipped" not in third and "data.n_check" in caplog.text
    n_check = read_validated(paths.behavior / "samples.parquet", Sample).filter(pl.col("kind") == "check_trigger")
    assert n_check.height == 6 * 3


def test_generate_resume_and_refuse(params, tiny_model_dir):
    run_make_data(params)
    paths = stage_paths(params)
    lm = load_model(tiny_model_dir, "cpu", "float32")
    s1 = generate_diffs(params, lm, paths.behavior, paths.diffs)
    assert s1["n_diffs"] == 6 and s1["shards_trained"] == 2
    m1 = read_validated(paths.diffs / "manifest.parquet", DiffManifest)
    assert m1["trigger_hit"].is_between(0, 1).all() and m1["check_kl"].is_not_null().all()
    assert set(m1["shard"]) == {"shard-00000.safetensors", "shard-00001.safetensors"}

    # A run that died after shard 0: shard 1's files are gone; the rerun trains only shard 1.
    store = DiffStore(paths.diffs)
    store.rows_path(1).unlink()
    store.shard_path(1).unlink()
    s2 = generate_diffs(params, lm, paths.behavior, paths.diffs)
    assert s2["shards_trained"] == 1 and s2["shards_skipped"] == 1
    m2 = read_validated(paths.diffs / "manifest.parquet", DiffManifest)
    # Same seeds, same data order: the resumed run reproduces the manifest. Only the file hash may
    # differ, since safetensors writes its metadata map in no fixed order.
    assert [c for c in m1.columns if not m1[c].equals(m2[c])] in ([], ["shard_sha256"])

    shard = store.load(["ht00005", "ht00000"], DiffModel(lm.model).shapes(), lm.sha256)
    assert shard.diff_ids == ["ht00005", "ht00000"]
    assert shard.A[next(iter(shard.A))].shape[0] == 2

    other = load_params(PARAMS, [*_overrides(params), "diffs.rank=2"])
    with pytest.raises(RuntimeError, match="other settings .*diffs.*--set diffs.run"):
        generate_diffs(other, lm, paths.behavior, paths.diffs)


def _overrides(p):
    return ["model.source=local", f"model.id={p.model.id}", f"paths.data={p.paths.data}"] + [
        f"data.{k}={v}" for k, v in p.data.model_dump().items() if v is not None] + [
        f"diffs.{k}={v}" for k, v in p.diffs.model_dump().items() if v is not None and k != "modules"]


def test_diff_specs_order_and_prefixes_beyond_900():
    from dit_core.data.behavior_data import make_diff_specs

    topic = make_diff_specs(section("data", n_topics=4, diffs_per_topic=3))
    rnd = make_diff_specs(section("data", n_topics=4, diffs_per_topic=3, diff_order="round"))
    assert topic["diff_id"].to_list() == rnd["diff_id"].to_list() == [f"ht{k:05d}" for k in range(12)]
    # topic order: ids 0-2 share a topic; round order: the first 4 ids are 4 different topics
    assert topic["topic"][:3].n_unique() == 1 and rnd["topic"][:4].n_unique() == 4
    assert sorted(topic["topic"].to_list()) == sorted(rnd["topic"].to_list())
    # 1,200 diffs: prefixes repeat only 900 diffs apart, so any 900 consecutive diffs have distinct ones
    big = make_diff_specs(section("data", n_topics=600, diffs_per_topic=2, diff_order="round"))
    pre = big["trigger_prefix"].to_list()
    assert len(pre) == 1200 and len(set(pre[:900])) == 900 and len(set(pre[300:1200])) == 900
    assert pre[900:] == pre[:300]


def test_diff_order_topic_keeps_old_records(params):
    from dit_core.behaviors import get_behavior

    _made_with = get_behavior("hidden_topic").made_with
    assert "diff_order" not in _made_with(params)["data"]
    assert _made_with(params.model_copy(update={"data": params.data.model_copy(
        update={"diff_order": "round"})}))["data"]["diff_order"] == "round"
