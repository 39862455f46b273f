"""Describe weight diffs with a trained interpreter: stored diff ids, diff files or PEFT adapters."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch

from dit_core.diffs.store import DiffShard, DiffStore, read_shard
from dit_core.interpreter.adapter import load_interpreter
from dit_core.interpreter.confidence import describe_confidence
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import LoadedModel
from dit_core.modeling.peft_io import import_peft

DESCRIBE_SCHEMA = {"diff": pl.String, "description": pl.String, "confidence": pl.Float64, "margin": pl.Float64,
                   "best_label": pl.String, "unsure": pl.Boolean}


def resolve_diffs(refs: list[str], dm: DiffModel, lm: LoadedModel, stores: list[Path] = (),
                  any_base: bool = False, full_rank: int | None = None) -> list[tuple[str, DiffShard]]:
    """Turn each reference into (name, one-row DiffShard): a PEFT dir, a finetuned model dir (reduced to
    `full_rank` by truncated SVD, dit_core.diffs.full), a .safetensors file, or a diff id."""
    from dit_core.diffs.full import import_full, is_full_checkpoint

    shapes = dm.shapes()
    out = []
    for ref in refs:
        path = Path(ref)
        if path.is_dir() and (path / "adapter_config.json").exists():
            out.append((ref, import_peft(path, shapes, lm.name, lm.sha256, any_base=any_base)))
        elif is_full_checkpoint(path):
            if full_rank is None:
                raise ValueError(f"{ref} is a finetuned model directory: pass full_rank (diffs.full_rank) to "
                                 "describe it")
            out.append((ref, import_full(path, dm, lm, full_rank, progress=False)[0]))
        elif path.suffix == ".safetensors" and path.is_file():
            shard = read_shard(path, shapes, lm.sha256)
            out += [(f"{ref}#{d}", shard.select([i])) for i, d in enumerate(shard.diff_ids)]
        else:
            for store in stores:
                m = DiffStore(store)
                if m.manifest_path.exists() and ref in set(m.manifest()["diff_id"]):
                    out.append((ref, m.load([ref], shapes, lm.sha256)))
                    break
            else:
                raise FileNotFoundError(f"{ref!r} is neither a PEFT adapter dir, a finetuned model dir, a diff "
                                        f".safetensors file, nor a diff id in {[str(s) for s in stores]}")
    return out


def describe(lm: LoadedModel, interpreter_dir: str | Path, refs: list[str], stores: list[Path] = (),
             modules: str = r".*", max_new_tokens: int = 16, batch_size: int = 16,
             behavior: str | None = None, any_base: bool = False, full_rank: int | None = None) -> pl.DataFrame:
    """One description per diff (batched, grouped by rank): columns diff, description, and how sure the
    interpreter is (`dit_core.interpreter.confidence`): confidence (the best known label's probability),
    margin, best_label, unsure (confidence below the threshold chosen on val); null for an interpreter
    saved without a label vocabulary (unsure null also where it has no threshold).

    behavior: ask that behaviour's question (one the interpreter was trained with); default its first.
    any_base: accept PEFT adapters that record another base model (see `import_peft`).
    full_rank: the rank finetuned model directories among `refs` are reduced to (diffs.full_rank).
    """
    dm = DiffModel(lm.model, modules)
    interp = load_interpreter(dm, interpreter_dir, lm.tokenizer, lm.sha256)
    known = interp.spec.questions or {}
    if behavior is not None and behavior not in known:
        raise ValueError(f"the interpreter in {interpreter_dir} was trained on behaviours {sorted(known) or ['(one)']}"
                         f", not {behavior!r}; pass one of those to --behavior")
    question = interp.spec.question_for(behavior)
    diffs = resolve_diffs(refs, dm, lm, stores, any_base, full_rank)
    results: dict[str, dict] = {}
    by_rank: dict[int, list[tuple[str, DiffShard]]] = {}
    for name, shard in diffs:
        by_rank.setdefault(shard.rank, []).append((name, shard))
    for group in by_rank.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            A = {m: torch.cat([s.A[m] for _, s in chunk]).to(lm.device) for m in dm.names}
            B = {m: torch.cat([s.B[m] for _, s in chunk]).to(lm.device) for m in dm.names}
            scale = torch.tensor([s.scale for _, s in chunk], device=lm.device)
            texts = interp.describe(lm.tokenizer, (A, B, scale), list(range(len(chunk))), max_new_tokens, question)
            sure = describe_confidence(interp, lm.tokenizer, behavior, question, (A, B, scale), len(chunk))
            results.update({name: {"description": t, **c} for (name, _), t, c in zip(chunk, texts, sure)})
    rows = [{"diff": n, **results[n]} for n, _ in diffs]
    return pl.DataFrame(rows, schema=DESCRIBE_SCHEMA)
