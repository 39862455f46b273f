"""Diff shards on Ray through prefect-ray: the generate-diffs flow on a local Ray instance with 2 CPU
workers trains 4 shards of the tiny model; the shards' tensors equal the in-process run's bit for bit (same
seeds, one thread each) and the manifest is the same. A rerun on Ray skips the complete shards."""

import shutil

import polars as pl
import pytest
import torch
from safetensors import safe_open

from conftest import PARAMS, tiny_overrides
from dit_core.config import load_params
from dit_core.modeling.models import sha256_file

SHARDS = 4


@pytest.fixture()
def ray_down():
    """Ray is shut down after the test, however it ends."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def _params(model_dir, data_dir, *extra):
    # 4 topics x 2 diffs, 2 diffs per shard: 4 shards
    return load_params(PARAMS, tiny_overrides(model_dir, data_dir) + [
        "tracking.enabled=false", "data.n_topics=4", "diffs.diffs_per_batch=2", *extra]).model_dump()


def test_shards_on_ray_equal_the_local_run(prefect_server, tmp_path, ray_down):
    import ray

    from dit_core.testing.tiny import make_tiny_model_dir
    from flows.pipeline import generate_diffs_stage
    from tasks.stage_runs import download, generate_diffs, make_data

    # Heads of 16 dims (hidden 64): at the tiny model's 8, torch's CPU flash attention rounds differently with
    # 1 thread (a Ray worker's) than with 2 when a batch has few rows (the shared prefix's one row per diff);
    # from 16 dims on, as in every real model, it gives the same bits.
    tiny_model_dir = make_tiny_model_dir(tmp_path / "tiny-64", hidden=64)

    local = _params(tiny_model_dir, tmp_path / "local" / "data")
    download(local)
    make_data(local)
    shutil.copytree(tmp_path / "local" / "data", tmp_path / "ray" / "data")  # the same behaviour data
    # A Ray worker with ray.num_cpus_per_shard=1 runs torch on 1 thread. torch's CPU kernels may split their
    # sums by thread count: MKL's fp32 matmuls (model.fp32_linear auto on Intel CPUs) do for a long inner
    # dimension, as in the factor gradients' sum over a micro-batch's tokens. So the local run that the
    # shards must equal bit for bit runs on 1 thread as well.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out_local = generate_diffs(local)
    finally:
        torch.set_num_threads(threads)
    assert out_local["n_diffs"] == 2 * SHARDS and out_local["shards_trained"] == SHARDS

    on_ray = _params(tiny_model_dir, tmp_path / "ray" / "data", "ray.address=local", "ray.num_cpus_per_shard=1")
    out_ray = generate_diffs_stage(on_ray)
    assert not ray.is_initialized()  # the flow's runner started Ray and shut it down
    assert out_ray["n_diffs"] == 2 * SHARDS and out_ray["shards_trained"] == SHARDS

    a, b = (tmp_path / side / "data" / "diffs" / "hidden_topic" for side in ("local", "ray"))
    for i in range(SHARDS):
        name = f"shard-{i:05d}.safetensors"
        # Tensors bit for bit and the same metadata (safetensors writes its metadata map in an order
        # that varies between processes, so the files' bytes are not compared).
        with safe_open(a / name, "pt") as fa, safe_open(b / name, "pt") as fb:
            assert fa.metadata() == fb.metadata(), name
            assert sorted(fa.keys()) == sorted(fb.keys()), name
            for key in fa.keys():
                assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), f"{name} {key} differs between local and Ray"
    ma, mb = pl.read_parquet(a / "manifest.parquet"), pl.read_parquet(b / "manifest.parquet")
    # the same rows but the file hashes, and each manifest records its own files' hashes
    assert ma.height == 2 * SHARDS and ma.drop("shard_sha256").equals(mb.drop("shard_sha256"))
    for store, m in ((a, ma), (b, mb)):
        for shard, sha in m.select("shard", "shard_sha256").unique().iter_rows():
            assert sha256_file(store / shard) == sha, (store, shard)

    again = generate_diffs_stage(on_ray)  # complete shards are skipped, on Ray as here
    assert again["shards_trained"] == 0 and again["shards_skipped"] == SHARDS
    assert pl.read_parquet(b / "manifest.parquet").equals(mb)


def test_ray_params_are_checked():
    from dit_core.config import ConfigError

    with pytest.raises(ConfigError, match="ray.address"):
        load_params(PARAMS, ["ray.address=http://head:10001"])
    with pytest.raises(ConfigError, match="ray.num_gpus_per_shard"):
        load_params(PARAMS, ["ray.num_gpus_per_shard=-1"])
    assert load_params(PARAMS, ["ray.address=ray://head:10001"]).ray.address == "ray://head:10001"
