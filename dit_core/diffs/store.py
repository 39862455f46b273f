"""Diff store: safetensors shards of stacked LoRA factors plus a validated manifest.

A shard `shard-00003.safetensors` holds T diffs: `<module>.A: [T, r, out]`, `<module>.B: [T, in, r]`.
Its metadata names the format, the base model and its sha256, rank, scale, module list, the diff ids
(in row order) and the factor convention (see dit_core.modeling.lora). Files are never pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit_core.io import atomic_path, write_parquet_atomic
from dit_core.modeling.lora import CONVENTION
from dit_core.modeling.models import check_recorded_sha256, sha256_file
from dit_core.data.schemas import DiffManifest, read_validated, validate, with_optional_columns

FORMAT = "dit-diff/1"
MANIFEST = "manifest.parquet"


class DiffFileError(ValueError):
    """A diff file is malformed or does not fit the base model; the message names file and fix."""


def store_file(root: str | Path, name: str) -> Path:
    """The shard `name` of the store in `root`; refused (DiffFileError) unless it is a plain file name there
    that does not lead, through a symlink, outside that folder: a manifest cannot make a read leave its store."""
    root = Path(root)
    if not name or Path(name).name != name or name in (".", ".."):
        raise DiffFileError(f"{root}: the manifest names shard {name!r}, which is not a file name in the store's "
                            "folder; regenerate the manifest with `dit stage generate-diffs`")
    path = root / name
    real, base = path.resolve(), root.resolve()
    if not real.is_relative_to(base):
        raise DiffFileError(f"{path}: leads (through a symlink) to {real}, outside the store {base}; a shard must "
                            "be a file in its store's folder: copy the file in place of the link, or regenerate it")
    return path


# Largest Frobenius norm of one module's weight change a diff may have. Base weights are O(10-100)
# (SmolLM2-135M: 16-206); a change 10^5 large swamps the model, and factors near float32's range make
# the forward overflow to Inf, which decoding turns into an empty answer instead of an error.
MAX_DELTA_NORM = 1e5


def check_delta_norm(source, name: str, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
    """Refuse a module whose weight change scale * (B @ A), for any diff (row), is not finite or larger than
    MAX_DELTA_NORM. A: (T, r, out), B: (T, in, r); computed in float64 through r x r Gram matrices
    (||B A||_F^2 = sum((B^T B) * (A A^T))), so the dense change is never formed."""
    # ||B A|| <= ||B|| ||A||: the cheap bound clears ordinary diffs without the Gram products (shards are
    # read every epoch when training streams them); only a row it cannot clear is computed exactly
    bound = torch.linalg.vector_norm(A.detach(), dim=(1, 2)) * torch.linalg.vector_norm(B.detach(), dim=(1, 2))
    if bool((bound * abs(float(scale)) <= MAX_DELTA_NORM).all()):
        return
    a, b = A.detach().double(), B.detach().double()
    sq = ((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum((1, 2)).clamp_min(0)
    norms = sq.sqrt() * abs(float(scale))
    bad = ~torch.isfinite(norms) | (norms > MAX_DELTA_NORM)
    if bad.any():
        t = int(bad.nonzero()[0, 0])
        raise DiffFileError(f"{source}: {name} (diff {t}) changes the weights by a Frobenius norm of "
                            f"{float(norms[t]):.3g}, above the {MAX_DELTA_NORM:.0e} a diff may have (base weights "
                            "are 10-100): its factors are corrupt or wrongly scaled (check lora_alpha and the "
                            "factors' units)")


def check_shard(source, shard: "DiffShard") -> "DiffShard":
    """NaN/Inf and size checks of every module of a shard built in memory (an imported adapter or finetune)."""
    for name in shard.modules:
        a, b = shard.A[name], shard.B[name]
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise DiffFileError(f"{source}: {name} contains NaN or Inf")
        check_delta_norm(source, name, a, b, shard.scale)
    return shard


@dataclass
class DiffShard:
    """Stacked factors of T diffs and the metadata they were stored with."""

    A: dict[str, torch.Tensor]  # (T, r, out)
    B: dict[str, torch.Tensor]  # (T, in, r)
    base_model: str
    base_sha256: str
    rank: int
    scale: float
    diff_ids: list[str]

    @property
    def modules(self) -> list[str]:
        return list(self.A)

    def select(self, rows: list[int]) -> "DiffShard":
        """A shard with only the given rows (diffs)."""
        idx = torch.tensor(rows)
        return DiffShard({k: v[idx] for k, v in self.A.items()}, {k: v[idx] for k, v in self.B.items()},
                         self.base_model, self.base_sha256, self.rank, self.scale,
                         [self.diff_ids[i] for i in rows])


def write_shard(path: str | Path, shard: DiffShard, extra_metadata: dict[str, str] | None = None) -> str:
    """Write a shard atomically; returns its sha256. `extra_metadata` (e.g. where an imported diff came
    from) is stored beside the format's keys, which it cannot replace."""
    tensors = {}
    for name in shard.modules:
        tensors[f"{name}.A"] = shard.A[name].detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.B"] = shard.B[name].detach().to("cpu", torch.float32).contiguous()
    meta = {
        "format": FORMAT,
        "base_model": shard.base_model,
        "base_sha256": shard.base_sha256,
        "rank": str(shard.rank),
        "scale": repr(float(shard.scale)),
        "modules": json.dumps(shard.modules),
        "diff_ids": json.dumps(shard.diff_ids),
        "convention": CONVENTION,
    }
    clash = set(extra_metadata or {}) & set(meta)
    if clash:
        raise ValueError(f"extra metadata keys {sorted(clash)} are reserved by the diff format")
    meta |= {k: str(v) for k, v in (extra_metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return sha256_file(Path(path))


def check_sha256(path: str | Path, recorded: str,
                 fix: str = "delete it and rerun `dit stage generate-diffs` (it retrains that shard)") -> None:
    """Refuse a file whose sha256 is not the one recorded when it was written."""
    check_recorded_sha256(path, recorded, fix, DiffFileError)


def read_shard(path: str | Path, expected: dict[str, tuple[int, int]] | None = None,
               base_sha256: str | None = None, sha256: str | None = None) -> DiffShard:
    """Read and validate a shard; `expected` maps module -> (in, out) of the base model; `sha256`, when
    given (the manifest's shard_sha256), must match the file before it is parsed."""
    path = Path(path)
    if sha256 is not None and path.is_file():
        check_sha256(path, sha256)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise DiffFileError(f"{path}: diff file not found") from None
    except Exception as e:
        raise DiffFileError(f"{path}: not a readable safetensors file ({e}); regenerate it") from e
    if meta.get("format") != FORMAT:
        raise DiffFileError(f"{path}: metadata format={meta.get('format')!r}, expected {FORMAT!r}; "
                            "import PEFT adapters with `dit import-peft`")
    try:
        modules, diff_ids = json.loads(meta["modules"]), json.loads(meta["diff_ids"])
        rank, scale = int(meta["rank"]), float(meta["scale"])
        meta["base_model"], meta["base_sha256"]  # noqa: B018  (required keys)
        if not (isinstance(modules, list) and isinstance(diff_ids, list) and rank >= 1):
            raise ValueError("modules and diff_ids must be lists and rank >= 1")
    except (KeyError, ValueError, TypeError) as e:
        raise DiffFileError(f"{path}: metadata is incomplete or malformed ({type(e).__name__}: {e}); expected "
                            "modules, diff_ids, rank, scale, base_model, base_sha256 as written by write_shard; "
                            "regenerate the file") from None
    if base_sha256 and meta["base_sha256"] != base_sha256:
        raise DiffFileError(f"{path}: made for base model {meta['base_model']} "
                            f"(sha256 {meta['base_sha256'][:12]}…), not this one ({base_sha256[:12]}…)")
    if expected is not None and set(modules) != set(expected):
        extra, missing = sorted(set(modules) - set(expected)), sorted(set(expected) - set(modules))
        raise DiffFileError(f"{path}: module names do not match the base model "
                            f"(unknown: {extra[:3]}, missing: {missing[:3]})")
    A, B = {}, {}
    T = len(diff_ids)
    for name in modules:
        a, b = tensors.get(f"{name}.A"), tensors.get(f"{name}.B")
        if a is None or b is None:
            raise DiffFileError(f"{path}: tensors for module {name} are missing")
        fan_in, fan_out = expected[name] if expected else (b.shape[1], a.shape[2])
        if tuple(a.shape) != (T, rank, fan_out) or tuple(b.shape) != (T, fan_in, rank):
            raise DiffFileError(
                f"{path}: {name} has A{tuple(a.shape)} B{tuple(b.shape)}, expected "
                f"A{(T, rank, fan_out)} B{(T, fan_in, rank)} (T diffs, rank, out/in features)")
        if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise DiffFileError(f"{path}: {name} has dtype {a.dtype}; expected a float type")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise DiffFileError(f"{path}: {name} contains NaN or Inf; the diff is broken, regenerate it")
        check_delta_norm(path, name, a, b, scale)
        A[name], B[name] = a.float(), b.float()
    return DiffShard(A, B, meta["base_model"], meta["base_sha256"], rank, scale, diff_ids)


class DiffStore:
    """A directory of shards and its manifest; resumable shard by shard."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST

    def manifest(self) -> pl.DataFrame:
        """The validated manifest."""
        if not self.manifest_path.exists():
            raise FileNotFoundError(f"{self.manifest_path} not found; run `dit stage generate-diffs`")
        return read_validated(self.manifest_path, DiffManifest)

    def shard_path(self, index: int) -> Path:
        return self.root / f"shard-{index:05d}.safetensors"

    def rows_path(self, index: int) -> Path:
        return self.root / f"shard-{index:05d}.rows.parquet"

    def is_complete(self, index: int, diff_ids: list[str]) -> bool:
        """True when the shard's rows are recorded for exactly these diffs and its file hash matches."""
        path, rows_path = self.shard_path(index), self.rows_path(index)
        if not (path.exists() and rows_path.exists()):
            return False
        rows = read_validated(rows_path, DiffManifest)
        return sorted(rows["diff_id"]) == sorted(diff_ids) and sha256_file(path) == rows["shard_sha256"][0]

    def add_shard(self, index: int, shard: DiffShard, rows: list[dict]) -> None:
        """Write the shard, then its manifest rows (the rows file is the commit point).

        Each shard has its own rows file, so shards can be trained concurrently (one task each) and
        `write_manifest` joins them afterwards.
        """
        sha = write_shard(self.shard_path(index), shard)
        new = pl.DataFrame([{**r, "shard": self.shard_path(index).name, "shard_sha256": sha} for r in rows])
        new = with_optional_columns(new, DiffManifest)
        new = validate(new.select(DiffManifest.to_schema().columns.keys()), DiffManifest, "new rows")
        write_parquet_atomic(new, self.rows_path(index))

    def write_manifest(self, n_shards: int, allow_missing: bool = False) -> pl.DataFrame:
        """Join the rows of shards 0..n_shards-1 into manifest.parquet (all must be complete unless
        `allow_missing`, when the finished ones are joined)."""
        missing = [i for i in range(n_shards) if not self.rows_path(i).exists()]
        if missing and not allow_missing:
            raise RuntimeError(f"{self.root}: shards {missing[:5]} are not complete; rerun generate-diffs")
        done = [i for i in range(n_shards) if i not in set(missing)]
        if not done:
            raise RuntimeError(f"{self.root}: no shard finished; raise diffs.budget_s or lower diffs.diffs_per_batch")
        df = pl.concat([read_validated(self.rows_path(i), DiffManifest) for i in done])
        df = validate(df, DiffManifest, str(self.manifest_path))
        write_parquet_atomic(df, self.manifest_path)
        return df

    def load(self, diff_ids: list[str], expected: dict[str, tuple[int, int]] | None = None,
             base_sha256: str | None = None) -> DiffShard:
        """Load the named diffs (any shards) as one stacked DiffShard, in the order given."""
        m = self.manifest().filter(pl.col("diff_id").is_in(diff_ids))
        missing = set(diff_ids) - set(m["diff_id"])
        if missing:
            raise KeyError(f"{self.root}: unknown diff ids {sorted(missing)[:5]}")
        parts: dict[str, tuple[DiffShard, int]] = {}
        for (shard_name, sha), g in m.group_by("shard", "shard_sha256", maintain_order=True):
            shard = read_shard(store_file(self.root, shard_name), expected, base_sha256, sha)
            for d, r in zip(g["diff_id"], g["row"]):
                parts[d] = (shard, r)
        from dit_core.diffs.bank import pad_rank  # the bank imports this module

        first = parts[diff_ids[0]][0]
        shards = [parts[d][0] for d in diff_ids]
        # Shards of several ranks (diffs.ranks) stack zero-padded to the highest; differing scales are
        # folded into A (scale * B @ A is each diff unchanged), so one stacked shard holds them all.
        rank = max(s.rank for s in shards)
        fold = len({s.scale for s in shards}) > 1
        scale = 1.0 if fold else first.scale
        A, B = {}, {}
        for n in first.modules:
            pairs = [pad_rank(sh.A[n][parts[d][1]] * (sh.scale if fold else 1.0), sh.B[n][parts[d][1]], rank)
                     for d, sh in zip(diff_ids, shards)]
            A[n] = torch.stack([a for a, _ in pairs])
            B[n] = torch.stack([b for _, b in pairs])
        return DiffShard(A, B, first.base_model, first.base_sha256, rank, scale, list(diff_ids))
