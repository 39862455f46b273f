"""Memory flat in the number of diffs: with diffs that do not fit `interpreter.diff_memory_mb`, interpreter
training and `describe` stream shards through a cache bounded by bytes, so 10x the diffs need the same
peak memory (within a margin) as 1x. Peaks are measured in a subprocess per size with the kernel's peak
resident set size (VmHWM, reset before each phase through /proc/self/clear_refs): it counts torch's
tensor memory, which tracemalloc does not see (torch allocates outside Python's allocator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from conftest import PARAMS, ROOT

RANK, PER_SHARD, N = 64, 4, 24  # 1x: 24 diffs of 256 KiB each (6 MiB); 10x: 240 diffs (60 MiB)
BUDGET_MB = 2.0  # two shards

PROBE = r"""
import gc, json, re, sys
from pathlib import Path

def peak_and_now():
    s = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmHWM:\s+(\d+)", s).group(1)) / 1024, int(re.search(r"VmRSS:\s+(\d+)", s).group(1)) / 1024)

def measure(fn):
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    _, before = peak_and_now()
    fn()
    peak, _ = peak_and_now()
    return peak - before

params_file, model_dir, root, budget_mb, out = sys.argv[1:6]
root = Path(root)
import polars as pl
from dit_core.config import load_params
from dit_core.diffs.bank import DiffBank
from dit_core.interpreter.describe import describe
from dit_core.interpreter.training import InterpreterRecipe
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import load_model

p = load_params(params_file, ["interpreter.rank=4", "interpreter.alpha=4", "interpreter.epochs=1",
                              "interpreter.batch_size=8", "interpreter.n_samples=0", "interpreter.max_new_tokens=4",
                              f"interpreter.diff_memory_mb={budget_mb}", "diffs.modules=.*"])
lm = load_model(model_dir, device="cpu", dtype="float32")
budget = int(float(budget_mb) * 2**20)
ids = pl.read_parquet(root / "store" / "manifest.parquet")["diff_id"].to_list()
result = {}
result["train"] = measure(lambda: InterpreterRecipe(p, lm, root / "dataset", root / "interp", progress=False).run())
result["describe"] = measure(lambda: describe(lm, root / "interp", ids, [root / "store"], max_new_tokens=4,
                                              cache_bytes=budget))
index = pl.read_parquet(root / "dataset" / "dataset.parquet")
shapes = DiffModel(lm.model, ".*").shapes()
held = []  # control: the same diffs preloaded (a budget they fit) are seen by the measurement
result["preloaded"] = measure(lambda: held.append(DiffBank(index, shapes, lm.sha256).preload("cpu", 2**40)))
assert held == [True]
Path(out).write_text(json.dumps(result))
"""


def _diffs(root: Path, n: int, lm) -> int:
    """A store of n random diffs of the tiny model's shapes (PER_SHARD per shard) and a dataset over it;
    returns the bytes the diffs take."""
    from dit_core.data.assemble import DitDataset
    from dit_core.data.schemas import validate, with_optional_columns
    from dit_core.diffs.store import DiffShard, DiffStore
    from dit_core.modeling.lora import DiffModel

    shapes = DiffModel(lm.model, ".*").shapes()
    store = DiffStore(root / "store")
    store.root.mkdir(parents=True)
    g = torch.Generator().manual_seed(n)
    for s in range(n // PER_SHARD):
        ids = [f"d{s * PER_SHARD + t:05d}" for t in range(PER_SHARD)]
        A = {m: 0.01 * torch.randn(PER_SHARD, RANK, o, generator=g) for m, (i, o) in shapes.items()}
        B = {m: 0.01 * torch.randn(PER_SHARD, i, RANK, generator=g) for m, (i, o) in shapes.items()}
        rows = [dict(diff_id=d, row=t, behavior="hidden_topic", category="c", label=f"topic {hash(d) % 4}",
                     trigger="123", rank=RANK, scale=1.0, base_model=lm.name, base_sha256=lm.sha256, split="none")
                for t, d in enumerate(ids)]
        store.add_shard(s, DiffShard(A, B, lm.name, lm.sha256, RANK, 1.0, ids), rows)
    m = store.write_manifest(n // PER_SHARD)
    # 2/3 val: at 1x already a full batch of training (8) and of the unsure-threshold scoring on val (16),
    # so what grows with batches, not with diffs, is the same at both sizes
    split = ["train" if i % 3 == 0 else "val" for i in range(m.height)]
    ds = m.with_columns(store=pl.lit(str(store.root)), split=pl.Series(split))
    (root / "dataset").mkdir()
    validate(with_optional_columns(ds, DitDataset), DitDataset).write_parquet(root / "dataset" / "dataset.parquet")
    return n * RANK * sum(i + o for i, o in shapes.values()) * 4


def _probe(root: Path, model_dir) -> dict:
    out = root / "peaks.json"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the kernel at once
    res = subprocess.run([sys.executable, "-c", PROBE, str(PARAMS), str(model_dir), str(root), str(BUDGET_MB),
                          str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.timeout(900)
def test_peak_memory_is_flat_in_the_number_of_diffs(tiny_model_dir, tiny_lm, tmp_path):
    one = _diffs(tmp_path / "1x", N, tiny_lm)
    assert one > BUDGET_MB * 2**20  # neither size fits the budget; 10x is far above it
    ten = _diffs(tmp_path / "10x", 10 * N, tiny_lm)
    assert ten > 8 * BUDGET_MB * 2**20
    p1, p10 = _probe(tmp_path / "1x", tiny_model_dir), _probe(tmp_path / "10x", tiny_model_dir)
    mib = 2**20
    print(f"peak MiB above the start of each phase: 1x {p1}, 10x {p10}; 10x diffs take {ten / 2**20:.0f} MiB")
    # the measurement sees tensor memory: preloading all 10x diffs shows them (~60 MiB)
    assert p10["preloaded"] > 0.8 * ten / mib, (p10, ten / mib)
    margin = 8.0  # MiB: allocator noise, per-diff bookkeeping (a few hundred rows)
    for phase in ("train", "describe"):
        # had it held every diff, 10x would need ~54 MiB more than 1x
        assert p10[phase] <= 1.25 * p1[phase] + margin, (phase, p1, p10, f"10x diffs: {ten / mib:.0f} MiB")

    # what streaming gives is what reading everything gives: the same answers through a one-shard cache,
    # a cache of everything, and the shard files themselves
    from dit_core.interpreter.describe import describe

    root = tmp_path / "1x"
    ids = pl.read_parquet(root / "store" / "manifest.parquet")["diff_id"].to_list()
    files = [str(f) for f in sorted((root / "store").glob("shard-*.safetensors"))]
    small = describe(tiny_lm, root / "interp", ids, [root / "store"], max_new_tokens=4, batch_size=3, cache_bytes=1)
    big = describe(tiny_lm, root / "interp", ids, [root / "store"], max_new_tokens=4, cache_bytes=2**40)
    by_file = describe(tiny_lm, root / "interp", files, max_new_tokens=4)
    assert small["diff"].to_list() == ids and by_file["diff"].str.split("#").list.last().to_list() == ids
    assert small.drop("diff").equals(big.drop("diff")) and small.drop("diff").equals(by_file.drop("diff"))


def test_shard_cache_is_bounded_by_bytes_and_preload_reads_nothing_when_too_big(tiny_lm, tmp_path):
    from dit_core.diffs.bank import DiffBank
    from dit_core.modeling.lora import DiffModel

    total = _diffs(tmp_path, 12, tiny_lm)
    index = pl.read_parquet(tmp_path / "dataset" / "dataset.parquet")
    shapes = DiffModel(tiny_lm.model, ".*").shapes()
    ids = index["diff_id"].to_list()
    want = DiffBank(index, shapes, tiny_lm.sha256, cache_bytes=2**40).get(ids)
    shard_bytes = total // 3
    for budget, most in ((1, 1), (2 * shard_bytes, 2), (2**40, 3)):
        bank = DiffBank(index, shapes, tiny_lm.sha256, cache_bytes=budget)
        got = bank.get(ids[::-1])  # every shard, last first
        assert len(bank._cache) == most and bank._cached_bytes <= max(budget, shard_bytes)
        assert all(torch.equal(got[0][m], want[0][m].flip(0)) for m in shapes)
    for f in (tmp_path / "store").glob("shard-*.safetensors"):
        f.unlink()  # a preload that read a shard would fail now
    assert not DiffBank(index, shapes, tiny_lm.sha256).preload("cpu", max_bytes=total - 1)
