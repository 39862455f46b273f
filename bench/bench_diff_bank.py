"""Host time of one interpreter batch's diff lookup: streamed from shards vs preloaded on the device.

    python bench/bench_diff_bank.py                 # SmolLM2-135M shapes, 256 diffs in shards of 64, CPU
    python bench/bench_diff_bank.py --device cuda   # the same, ending on the GPU

Writes random rank-1 diffs with SmolLM2-135M's module shapes (30 layers x 7 linears; no model needed),
then times `DiffBank.get` for shuffled batches of --batch ids, the way the interpreter trainer asks:
streamed (stack per-diff rows on the host, then copy every module to the device) against preloaded
(`DiffBank.preload`: one gather per module where the diffs already sit). Both in this process; the
streamed run is the reference. Results go to reports/bench/diff_bank.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_core.diffs.bank import DiffBank  # noqa: E402
from dit_core.diffs.store import DiffShard, write_shard  # noqa: E402

# SmolLM2-135M: hidden 576, 9 query heads / 3 key-value heads of 64, MLP 1536, 30 layers
SMOLLM2 = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
           "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


def shapes(n_layers: int = 30) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(n_layers):
        for name, io in SMOLLM2.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out[f"model.layers.{i}.{part}.{name}"] = io
    return out


def write_bank(root: Path, n_diffs: int, per_shard: int, rank: int = 1) -> pl.DataFrame:
    """Random diffs in shards; returns the index (diff_id, store, shard, row) a DiffBank reads."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for s in range(0, n_diffs, per_shard):
        ids = [f"d{i:05d}" for i in range(s, min(s + per_shard, n_diffs))]
        A = {m: torch.randn(len(ids), rank, o, generator=g) * 0.01 for m, (i, o) in shapes().items()}
        B = {m: torch.randn(len(ids), i, rank, generator=g) * 0.01 for m, (i, o) in shapes().items()}
        name = f"shard-{s // per_shard:05d}.safetensors"
        write_shard(root / name, DiffShard(A, B, "bench", "0" * 64, rank, 1.0, ids))
        rows += [{"diff_id": d, "store": str(root), "shard": name, "row": r} for r, d in enumerate(ids)]
    return pl.DataFrame(rows)


def time_gets(bank: DiffBank, ids: list[str], batch: int, device: torch.device, epochs: int) -> float:
    """Seconds per batch lookup, batches in a shuffled order, result on `device` (as the trainer uses it)."""
    rng = random.Random(0)
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = ids[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch):
            A, B, scale = bank.get(order[i : i + batch])
            A = {k: v.to(device) for k, v in A.items()}
            B = {k: v.to(device) for k, v in B.items()}
            n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--diffs", type=int, default=256)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench" / "diff_bank.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        index = write_bank(Path(tmp), args.diffs, args.per_shard)
        ids = index["diff_id"].to_list()
        streamed = DiffBank(index, shapes(), cache_bytes=1 << 30)  # every shard stays cached, as before
        time_gets(streamed, ids, args.batch, device, 1)  # warm-up: shards into the cache
        t_stream = time_gets(streamed, ids, args.batch, device, args.epochs)
        pre = DiffBank(index, shapes())
        t0 = time.perf_counter()
        assert pre.preload(device)
        t_load = time.perf_counter() - t0
        time_gets(pre, ids, args.batch, device, 1)
        t_pre = time_gets(pre, ids, args.batch, device, args.epochs)
    res = {"device": str(device), "diffs": args.diffs, "per_shard": args.per_shard, "batch": args.batch,
           "modules": len(shapes()), "streamed_ms_per_batch": round(1e3 * t_stream, 2),
           "preloaded_ms_per_batch": round(1e3 * t_pre, 2), "preload_seconds": round(t_load, 2),
           "speedup": round(t_stream / t_pre, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
