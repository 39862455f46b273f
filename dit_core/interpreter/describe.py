"""Describe weight diffs with a trained interpreter: stored diff ids, diff files or PEFT adapters."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterator

import polars as pl
import torch

from dit_core.diffs.bank import DiffBank, pad_rank
from dit_core.diffs.store import DiffShard, DiffStore, read_shard
from dit_core.interpreter.adapter import load_interpreter
from dit_core.interpreter.confidence import describe_confidence
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import LoadedModel
from dit_core.modeling.peft_io import import_peft

DESCRIBE_SCHEMA = {"diff": pl.String, "description": pl.String, "confidence": pl.Float64, "margin": pl.Float64,
                   "best_label": pl.String, "unsure": pl.Boolean, "no_behavior": pl.Boolean}


def _id_bank(ids: list[str], stores: list[Path], shapes: dict, base_sha256: str, cache_bytes: int) -> DiffBank:
    """A bank over the stored diffs named by `ids` (the first store holding each); refuses unknown ids
    before any shard is read."""
    left, parts = set(ids), []
    for store in stores:
        m = DiffStore(store)
        if not left or not m.manifest_path.exists():
            continue
        rows = m.manifest().filter(pl.col("diff_id").is_in(sorted(left)))
        parts.append(rows.with_columns(store=pl.lit(str(store))))
        left -= set(rows["diff_id"])
    if left:
        ref = next(r for r in ids if r in left)
        raise FileNotFoundError(f"{ref!r} is neither a PEFT adapter dir, a finetuned model dir, a diff "
                                f".safetensors file, nor a diff id in {[str(s) for s in stores]}")
    return DiffBank(pl.concat(parts, how="diagonal_relaxed"), shapes, base_sha256, cache_bytes=cache_bytes)


def iter_diffs(refs: list[str], dm: DiffModel, lm: LoadedModel, stores: list[Path] = (), any_base: bool = False,
               full_rank: int | None = None, cache_bytes: int = 512 * 2**20) -> Iterator[tuple[str, DiffShard]]:
    """Each reference as (name, one-row DiffShard), read when it is reached: a PEFT dir, a finetuned model
    dir (reduced to `full_rank` by truncated SVD, dit_core.diffs.full), a .safetensors file (one row per
    diff in it, named file#id), or a diff id (its shard streamed through a cache of at most `cache_bytes`),
    so memory stays flat in the number of diffs. A reference that is none of these is refused before
    anything is read."""
    from dit_core.diffs.full import import_full, is_full_checkpoint

    shapes = dm.shapes()
    kinds = []
    for ref in refs:
        path = Path(ref)
        if path.is_dir() and (path / "adapter_config.json").exists():
            kinds.append("peft")
        elif is_full_checkpoint(path):
            if full_rank is None:
                raise ValueError(f"{ref} is a finetuned model directory: pass full_rank (diffs.full_rank) to "
                                 "describe it")
            kinds.append("full")
        elif path.suffix == ".safetensors" and path.is_file():
            kinds.append("file")
        else:
            kinds.append("id")
    ids = [r for r, k in zip(refs, kinds) if k == "id"]
    bank = _id_bank(ids, list(stores), shapes, lm.sha256, cache_bytes) if ids else None
    for ref, kind in zip(refs, kinds):
        if kind == "peft":
            yield ref, import_peft(Path(ref), shapes, lm.name, lm.sha256, any_base=any_base)
        elif kind == "full":
            yield ref, import_full(Path(ref), dm, lm, full_rank, progress=False)[0]
        elif kind == "file":
            shard = read_shard(Path(ref), shapes, lm.sha256)
            for i, d in enumerate(shard.diff_ids):
                yield f"{ref}#{d}", shard.select([i])
            del shard
        else:
            A, B, scale = bank.get([ref])
            rank = next(iter(A.values())).shape[1]
            yield ref, DiffShard(A, B, lm.name, lm.sha256, rank, float(scale[0]), [ref])


def resolve_diffs(refs: list[str], dm: DiffModel, lm: LoadedModel, stores: list[Path] = (),
                  any_base: bool = False, full_rank: int | None = None) -> list[tuple[str, DiffShard]]:
    """Every reference's diffs at once (see `iter_diffs`, which reads them as they are needed)."""
    return list(iter_diffs(refs, dm, lm, stores, any_base, full_rank))


def describe(lm: LoadedModel, interpreter_dir: str | Path, refs: list[str], stores: list[Path] = (),
             modules: str = r".*", max_new_tokens: int = 16, batch_size: int = 16,
             behavior: str | None = None, any_base: bool = False, full_rank: int | None = None,
             cache_bytes: int = 512 * 2**20) -> pl.DataFrame:
    """One description per diff (in batches of `batch_size`, read as they are reached): columns diff, description, and how sure the
    interpreter is (`dit_core.interpreter.confidence`): confidence (the best known label's probability),
    margin, best_label, unsure (confidence below the threshold chosen on val), null for an interpreter
    saved without a label vocabulary (unsure null also where it has no threshold); no_behavior: the
    description is the answer it was trained to give on diffs with no behaviour (interpreter.null_answer).

    behavior: ask that behaviour's question (one the interpreter was trained with); default its first.
    any_base: accept PEFT adapters that record another base model (see `import_peft`).
    full_rank: the rank finetuned model directories among `refs` are reduced to (diffs.full_rank).
    cache_bytes: most memory the cache of stored shards takes (interpreter.diff_memory_mb).
    """
    dm = DiffModel(lm.model, modules)
    interp = load_interpreter(dm, interpreter_dir, lm.tokenizer, lm.sha256)
    known = interp.spec.questions or {}
    if behavior is not None and behavior not in known:
        raise ValueError(f"the interpreter in {interpreter_dir} was trained on behaviours {sorted(known) or ['(one)']}"
                         f", not {behavior!r}; pass one of those to --behavior")
    question = interp.spec.question_for(behavior)
    rows = []
    diffs = iter_diffs(refs, dm, lm, stores, any_base, full_rank, cache_bytes)
    while chunk := list(islice(diffs, batch_size)):  # one batch in memory at a time
        rank = max(s.rank for _, s in chunk)  # lower ranks zero-padded (pad_rank): the same diffs
        padded = {m: [pad_rank(s.A[m], s.B[m], rank) for _, s in chunk] for m in dm.names}
        A = {m: torch.cat([a for a, _ in v]).to(lm.device) for m, v in padded.items()}
        B = {m: torch.cat([b for _, b in v]).to(lm.device) for m, v in padded.items()}
        scale = torch.tensor([s.scale for _, s in chunk], device=lm.device)
        texts = interp.describe(lm.tokenizer, (A, B, scale), list(range(len(chunk))), max_new_tokens, question)
        sure = describe_confidence(interp, lm.tokenizer, behavior, question, (A, B, scale), len(chunk))
        rows += [{"diff": name, "description": t, **c, "no_behavior": t.strip() == interp.spec.null_answer}
                 for (name, _), t, c in zip(chunk, texts, sure)]
    return pl.DataFrame(rows, schema=DESCRIBE_SCHEMA)
