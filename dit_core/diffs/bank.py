"""Streaming access to stored diffs by id: shards are read on demand and a few are kept in memory."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import polars as pl
import torch

from dit_core.diffs.store import DiffShard, read_shard, store_file
from dit_core.modeling.batching import to_device


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors A (..., r, out) and B (..., in, r) with zero rank components added up to `rank`: the same
    diff (B @ A is unchanged), so diffs of several ranks (e.g. a mixture of behaviours) stack in one batch."""
    r = A.shape[-2]
    if r == rank:
        return A, B
    return (torch.nn.functional.pad(A, (0, 0, 0, rank - r)), torch.nn.functional.pad(B, (0, rank - r)))


def _nbytes(shard: DiffShard) -> int:
    return sum(t.numel() * t.element_size() for d in (shard.A, shard.B) for t in d.values())


class DiffBank:
    """Look up diffs by id across stores; keeps the most recently used shards, at most `cache_bytes` of
    them (always the one in use), so memory stays flat in the number of diffs.

    After `preload(device)` every diff of the index sits on the device, stacked per module, and `get`
    gathers rows there (one index per module) instead of stacking per-diff tensors on the host and
    copying each module's batch over: what an interpreter step on a GPU would otherwise wait for.
    """

    def __init__(self, index: pl.DataFrame, expected: dict[str, tuple[int, int]] | None = None,
                 base_sha256: str | None = None, cache_bytes: int = 512 * 2**20):
        # index: one row per diff with columns diff_id, store, shard, row; each shard must be a file in
        # its store's folder (store_file refuses a name or symlink that leads out of it)
        files = {(s, sh): store_file(s, sh) for s, sh in index.select("store", "shard").unique().iter_rows()}
        self._where = {d: (files[s, sh], r) for d, s, sh, r in
                       index.select("diff_id", "store", "shard", "row").iter_rows()}
        # the sha256 each shard had when it was written, checked the first time a shard is read (a streamed
        # shard is read again every epoch; hashing it each time would double the reads)
        self._sha = ({Path(s) / sh: h for s, sh, h in index.select("store", "shard", "shard_sha256").iter_rows()}
                     if "shard_sha256" in index.columns else {})
        self.expected, self.base_sha256 = expected, base_sha256
        self._cache: OrderedDict[Path, DiffShard] = OrderedDict()
        self.cache_bytes, self._cached_bytes = cache_bytes, 0
        # for a size estimate before anything is read (preload): the highest rank the index records
        self._max_rank = int(index["rank"].max()) if "rank" in index.columns and index.height else None
        self._stacked: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor] | None = None
        self._position: dict[str, int] = {}

    def preload(self, device, max_bytes: int = 4 * 2**30) -> bool:
        """Hold every indexed diff on `device` (lower ranks zero-padded to the highest) if they take at most
        `max_bytes`.

        Returns whether it did; if not, `get` keeps streaming shards from disk.
        """
        if self.expected is not None and self._max_rank is not None:  # too big by the index: read nothing
            per_diff = self._max_rank * sum(i + o for i, o in self.expected.values()) * 4  # float32 factors
            if len(self._where) * per_diff > max_bytes:
                return False
        paths = sorted({path for path, _ in self._where.values()})
        by_path = {path: [] for path in paths}
        for d, (path, row) in self._where.items():
            by_path[path].append((d, row))
        A: dict[str, list[torch.Tensor]] = {}
        B: dict[str, list[torch.Tensor]] = {}
        scales, position, ranks = [], {}, set()
        for path in paths:
            shard = read_shard(path, self.expected, self.base_sha256, self._sha.pop(path, None))
            ranks.add(shard.rank)
            rows = torch.tensor([row for _, row in by_path[path]])
            for m in shard.modules:
                A.setdefault(m, []).append(shard.A[m].index_select(0, rows))
                B.setdefault(m, []).append(shard.B[m].index_select(0, rows))
            # padded size: every diff so far at the highest rank so far
            per_rank = sum((shard.A[m].shape[2] + shard.B[m].shape[1]) * shard.A[m].element_size()
                           for m in shard.modules)
            if (len(scales) + rows.numel()) * max(ranks) * per_rank > max_bytes:
                return False
            for d, _ in by_path[path]:
                position[d] = len(scales)
                scales.append(shard.scale)
        rank = max(ranks)
        padded = {m: [pad_rank(a, b, rank) for a, b in zip(A[m], B[m])] for m in A}
        self._stacked = ({m: torch.cat([a for a, _ in v]).to(device) for m, v in padded.items()},
                         {m: torch.cat([b for _, b in v]).to(device) for m, v in padded.items()},
                         torch.tensor(scales, device=device))
        self._position = position
        return True

    def _shard(self, path: Path) -> DiffShard:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        shard = read_shard(path, self.expected, self.base_sha256, self._sha.pop(path, None))
        self._cache[path] = shard
        self._cached_bytes += _nbytes(shard)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= _nbytes(self._cache.popitem(last=False)[1])
        return shard

    def get(self, diff_ids: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """Stacked factors A: (n, r, out), B: (n, in, r) and per-diff scales (n,) for these ids
        (on the preload device after `preload`, else on the host)."""
        missing = [d for d in diff_ids if d not in self._where]
        if missing:
            raise KeyError(f"unknown diff ids {missing[:5]}")
        if self._stacked is not None:
            A, B, scale = self._stacked
            idx = to_device(torch.tensor([self._position[d] for d in diff_ids]), scale.device)
            return ({m: v.index_select(0, idx) for m, v in A.items()},
                    {m: v.index_select(0, idx) for m, v in B.items()}, scale.index_select(0, idx))
        picked = [(self._shard(self._where[d][0]), self._where[d][1]) for d in diff_ids]
        rank = max(s.rank for s, _ in picked)  # lower ranks zero-padded (pad_rank): the same diffs
        modules = picked[0][0].modules
        pairs = {m: [pad_rank(s.A[m][r], s.B[m][r], rank) for s, r in picked] for m in modules}
        A = {m: torch.stack([a for a, _ in v]) for m, v in pairs.items()}
        B = {m: torch.stack([b for _, b in v]) for m, v in pairs.items()}
        return A, B, torch.tensor([s.scale for s, _ in picked])
