"""Streaming access to stored diffs by id: shards are read on demand and a few are kept in memory."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import polars as pl
import torch

from dit_core.diff_store import DiffShard, read_shard


class DiffBank:
    """Look up diffs by id across stores; keeps the `cache_shards` most recently used shards."""

    def __init__(self, index: pl.DataFrame, expected: dict[str, tuple[int, int]] | None = None,
                 base_sha256: str | None = None, cache_shards: int = 8):
        # index: one row per diff with columns diff_id, store, shard, row
        self._where = {d: (Path(s) / sh, r) for d, s, sh, r in
                       index.select("diff_id", "store", "shard", "row").iter_rows()}
        self.expected, self.base_sha256 = expected, base_sha256
        self._cache: OrderedDict[Path, DiffShard] = OrderedDict()
        self.cache_shards = cache_shards

    def _shard(self, path: Path) -> DiffShard:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        shard = read_shard(path, self.expected, self.base_sha256)
        self._cache[path] = shard
        if len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return shard

    def get(self, diff_ids: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """Stacked factors A: (n, r, out), B: (n, in, r) and per-diff scales (n,) for these ids."""
        missing = [d for d in diff_ids if d not in self._where]
        if missing:
            raise KeyError(f"unknown diff ids {missing[:5]}")
        picked = [(self._shard(self._where[d][0]), self._where[d][1]) for d in diff_ids]
        ranks = {s.rank for s, _ in picked}
        if len(ranks) > 1:
            raise ValueError(f"diffs {diff_ids[:3]}… mix ranks {sorted(ranks)}; batch them by rank")
        modules = picked[0][0].modules
        A = {m: torch.stack([s.A[m][r] for s, r in picked]) for m in modules}
        B = {m: torch.stack([s.B[m][r] for s, r in picked]) for m in modules}
        return A, B, torch.tensor([s.scale for s, _ in picked])
