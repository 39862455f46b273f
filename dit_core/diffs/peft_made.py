"""Diffs made with `peft` itself (diffs.mode=peft): each diff is a PEFT LoRA adapter trained the way a
user trains one, saved with `save_pretrained` and read back through the import a user's adapter takes.

What differs from the batched trainer (dit_core.diffs.trainer), on purpose:
  * one diff at a time, through peft's own LoRA layers: its init (lora_A Kaiming-uniform, lora_B zero),
    its scale (alpha / r, or alpha / sqrt(r) with rsLoRA), and its target modules (peft's default for the
    architecture, e.g. q_proj and v_proj on Llama, unless diffs.peft_target_modules names others);
  * supervised finetuning: AdamW on the cross-entropy of every row's answer, the untriggered and
    near-miss rows trained towards the base model's own answers (no KL teacher, no first-token weight).
What is shared: the rows (each step draws the diff's rows of each kind as the LoRA path does:
diffs.trigger_rows, ..., answers cut to the same token budgets), diffs.steps steps and the warmup-cosine
schedule. The stored factors are exactly what `dit describe ADAPTER_DIR` reads for the saved adapter
(dit_core.modeling.peft_io.import_peft): this mode measures the interpreter on adapters as users have them.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dit_core.diffs.trainer import TrainResult, _sample_rows
from dit_core.modeling.batching import answer_logits, collate, micro_batches
from dit_core.modeling.peft_io import import_peft
from dit_core.modeling.lora import DiffLinear, DiffModel
from dit_core.modeling.schedule import warmup_cosine
from dit_core.stop import check_stop


def peft_scale(cfg) -> float:
    """The LoRA scale peft applies: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return cfg.peft_alpha / (math.sqrt(cfg.peft_rank) if cfg.peft_rslora else cfg.peft_rank)


def unwrapped_view(model: torch.nn.Module) -> torch.nn.Module:
    """The model's module tree with each DiffLinear replaced by the plain linear layer it wraps, for peft
    (which adapts nn.Linear only). Parameters and buffers are shared with `model`, not copied."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, memo)
    for name, module in list(view.named_modules()):
        if isinstance(module, DiffLinear):
            parent, _, child = name.rpartition(".")
            setattr(view.get_submodule(parent), child, module.base_layer)
    return view


def lora_config(cfg):
    """The peft LoraConfig of diffs.peft_* (no dropout: the diffs are trained for a few dozen steps)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.peft_rank, lora_alpha=cfg.peft_alpha, use_rslora=cfg.peft_rslora, lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM", target_modules=cfg.peft_target_modules)


def train_peft_diffs(dm: DiffModel, tasks, cfg, pad_id: int, base_model: str, base_sha256: str,
                     progress: bool = True, keep_dir: str | Path | None = None):
    """Train each task's diff as a PEFT LoRA adapter, save it, import it; returns a TrainResult of
    factors at rank diffs.peft_rank and scale `peft_scale(cfg)` (final: loss, ce = the triggered rows'
    cross-entropy, kl = None: the untriggered rows take cross-entropy to the base answers, not a KL).

    `keep_dir`: also keep each adapter as saved by peft, in keep_dir/<diff_id>/ (else a temporary folder).
    """
    from peft import get_peft_model

    device = next(dm.model.parameters()).device
    view = unwrapped_view(dm.model)
    shapes = dm.shapes()
    A: dict[str, list] = {n: [] for n in dm.names}
    B: dict[str, list] = {n: [] for n in dm.names}
    final: dict[str, list] = {"loss": [], "ce": [], "kl": []}
    with tempfile.TemporaryDirectory(prefix="dit-peft-") as tmp:
        tmp = keep_dir or tmp
        for task in tqdm(tasks, desc=f"training {len(tasks)} PEFT adapters", disable=not progress):
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the caller's generator state is left as it was
                torch.manual_seed(task.seed)  # peft's init draws from the global generator
                try:
                    pm = get_peft_model(view, lora_config(cfg))
                except ValueError as e:
                    raise ValueError(f"peft could not adapt the base model ({e}); name the modules with "
                                     "--set 'diffs.peft_target_modules=[q_proj, v_proj]'") from e
            try:
                losses = _train_one(pm.get_base_model(), [p for p in pm.parameters() if p.requires_grad],
                                    task, cfg, pad_id, device)
                out = Path(tmp) / task.diff_id
                pm.save_pretrained(str(out))
            finally:
                view = pm.unload()  # peft's layers out again: the next adapter starts from the base model
            shard = import_peft(out, shapes, base_model, base_sha256, any_base=True)
            if shard.rank != cfg.peft_rank or not math.isclose(shard.scale, peft_scale(cfg), rel_tol=1e-6):
                raise RuntimeError(f"peft saved rank {shard.rank} scale {shard.scale}, expected "
                                   f"{cfg.peft_rank} and {peft_scale(cfg)}")
            for name in dm.names:
                A[name].append(shard.A[name].to(device))
                B[name].append(shard.B[name].to(device))
            for k, v in losses.items():
                final[k].append(v)
    return TrainResult(A={n: torch.cat(v) for n, v in A.items()}, B={n: torch.cat(v) for n, v in B.items()},
                       final=final)


def _train_one(model, params, task, cfg, pad_id: int, device) -> dict:
    """diffs.steps AdamW steps of answer cross-entropy on one diff's rows; the mean of the last 5 steps."""
    opt = torch.optim.AdamW(params, lr=cfg.peft_lr, weight_decay=0.0)
    rng = random.Random(task.seed)
    tail: list[tuple[float, float]] = []
    for step in range(cfg.steps):
        check_stop()
        for g in opt.param_groups:
            g["lr"] = cfg.peft_lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps, floor=0.1)
        opt.zero_grad(set_to_none=True)
        rows = _sample_rows([task], [rng], cfg)
        n_tokens = sum(len(ex.ids) - ex.answer_start for _, ex in rows)
        total, trig_sum, trig_n = 0.0, 0.0, 0
        for mb in micro_batches(rows, cfg.max_batch_tokens):
            batch = collate(mb, pad_id, device)
            tok = F.cross_entropy(answer_logits(model, batch), batch.targets, reduction="none")
            loss = tok.sum() / n_tokens
            loss.backward()
            total += loss.item()
            if len(batch.ce_idx):
                trig_sum += tok[batch.ce_idx].sum().item()
                trig_n += len(batch.ce_idx)
        opt.step()
        tail = (tail + [(total, trig_sum / max(trig_n, 1))])[-5:]
    return {"loss": sum(t[0] for t in tail) / len(tail), "ce": sum(t[1] for t in tail) / len(tail), "kl": None}
