"""The reference approach: diff generation and interpreter training as a user of the original method
would write them, for `bench/bench_vs_reference.py` to time against the project's code.

Diff generation (`reference_train_diffs`): the KL teacher is a deep copy of the base model; every diff
gets fresh LoRA modules (peft's `get_peft_model`, removed again with `unload()` after the diff), and
each step runs that diff's rows as one right-padded batch in their given order (no length sorting, no
micro-batches), full logits at every position, the teacher run on the diff's own KL rows (a KL row
shared by several diffs runs once per diff). Diffs are trained one after another.

Interpreter training (`ReferenceInterpreter`): every adapted linear layer holds, for each sample of
the batch, its merged weight W + scale * (B @ A)^T (batch x out x in per layer), and runs the batch
with one bmm per layer plus the interpreter LoRA; full logits, per-row mean label cross-entropy.

Both train the same thing as the project (same rows, losses, initial factors, optimizer and learning
-rate schedule): `tests/test_bench_reference.py` checks the losses and the trained factors agree.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dit_core.config import DiffsConfig
from dit_core.diffs.trainer import DiffTask, _sample_rows, init_factors, shares_kl_rows
from dit_core.modeling.batching import Example, is_ce
from dit_core.modeling.lora import linear_module_names
from dit_core.modeling.schedule import warmup_cosine

PARTS = ("ce", "kl", "kl_no_trigger", "kl_wrong_prefix")


def planned_rows(tasks: list[DiffTask], cfg: DiffsConfig) -> list[list[tuple[int, Example]]]:
    """Every step's rows as `train_diffs` draws them (same generators, same order): the reference
    trains on exactly these."""
    rngs = [random.Random(t.seed) for t in tasks]
    step_rng = random.Random(",".join(str(t.seed) for t in tasks)) if shares_kl_rows(tasks, cfg) else None
    return [_sample_rows(tasks, rngs, cfg, step_rng) for _ in range(cfg.steps)]


def pad_batch(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask, rows in the given order."""
    width = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, ex in enumerate(examples):
        ids[i, : len(ex.ids)] = torch.tensor(ex.ids)
        mask[i, : len(ex.ids)] = 1
    return ids.to(device), mask.to(device)


def answer_weights(ex: Example, width: int, first_token_weight: float) -> torch.Tensor:
    """(width,) weights on the positions that predict the answer tokens (0 elsewhere)."""
    w = torch.zeros(width)
    if len(ex.ids) > ex.answer_start:
        w[ex.answer_start - 1 : len(ex.ids) - 1] = 1.0
        w[ex.answer_start - 1] = first_token_weight
    return w


@dataclass
class ReferenceResult:
    """Trained factors in the project's convention (A: (T, r, out), B: (T, in, r)), every step's
    per-diff loss parts (history[step][part]: (T,) tensor) and `final` as `train_diffs` reports it."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    history: list[dict[str, torch.Tensor]]
    final: dict[str, list[float]]
    seconds_copy: float = 0.0  # deep copy of the teacher
    seconds_wrap: float = 0.0  # get_peft_model + unload, all diffs


def diff_loss_parts(logits: torch.Tensor, teacher_logits: torch.Tensor | None, examples: list[Example],
                    kl_rows: list[int], first_token_weight: float) -> dict[str, torch.Tensor]:
    """One diff's loss parts from full (b, s, V) logits: weighted token means of the cross-entropy
    on CE rows and of KL(base || diff) on the KL rows (`teacher_logits` holds those rows, in order)."""
    b, s, _ = logits.shape
    logp = F.log_softmax(logits.float(), dim=-1)
    targets = torch.zeros(b, s, dtype=torch.long, device=logits.device)
    for i, ex in enumerate(examples):
        targets[i, : len(ex.ids) - 1] = torch.tensor(ex.ids[1:])
    tok_ce = -logp.gather(-1, targets[..., None])[..., 0]  # (b, s)
    tok_kl = torch.zeros(b, s, device=logits.device)
    if kl_rows:
        t_logp = F.log_softmax(teacher_logits.float(), dim=-1)
        kl = (t_logp.exp() * (t_logp - logp[kl_rows])).sum(-1)  # (k, s)
        tok_kl = tok_kl.index_copy(0, torch.tensor(kl_rows, device=logits.device), kl)
    sums = {k: logits.new_zeros((), dtype=torch.float32) for k in PARTS}
    norms = {k: 0.0 for k in PARTS}
    for i, ex in enumerate(examples):
        w = answer_weights(ex, s, first_token_weight)  # on the host: its sum needs no device read
        groups = ("ce",) if is_ce(ex.kind) else ("kl", f"kl_{ex.kind}")
        val = (w.to(logits.device) * (tok_ce[i] if is_ce(ex.kind) else tok_kl[i])).sum()
        for k in groups:
            sums[k] = sums[k] + val
            norms[k] += float(w.sum())
    return {k: sums[k] / max(norms[k], 1e-6) for k in PARTS}


def reference_train_diffs(model: nn.Module, tasks: list[DiffTask], cfg: DiffsConfig, pad_id: int,
                          rows: list[list[tuple[int, Example]]] | None = None, on_step=None) -> ReferenceResult:
    """Train the diffs one after another, as the original method does: deep-copied teacher, fresh
    LoRA modules per diff, one padded batch per step. `model` is a plain (unwrapped) causal LM; it is
    left as it came. `rows`: every step's rows (default: `planned_rows`, those `train_diffs` draws).
    `on_step(diff, step)` runs after every optimizer step (the benchmark times steps with it)."""
    import time

    from peft import LoraConfig, get_peft_model

    rows = rows if rows is not None else planned_rows(tasks, cfg)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_copy = time.perf_counter() - t0
    names = linear_module_names(model, cfg.modules)
    shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names}
    A0, B0 = init_factors(shapes, [t.seed for t in tasks], cfg.rank, cfg.init_std, "cpu")
    A_out = {n: torch.zeros_like(A0[n]) for n in names}
    B_out = {n: torch.zeros_like(B0[n]) for n in names}
    history = [{k: torch.zeros(len(tasks)) for k in PARTS} for _ in range(cfg.steps)]
    t_wrap = 0.0
    for t in range(len(tasks)):
        t0 = time.perf_counter()
        for p in model.parameters():
            p.requires_grad_(False)
        lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.scale * cfg.rank, lora_dropout=0.0, target_modules=names,
                          bias="none")
        peft_model = get_peft_model(model, lcfg)
        layers = {n: peft_model.base_model.model.get_submodule(n) for n in names}
        with torch.no_grad():  # the project's seeded init; peft: lora_A (r, in) = B^T, lora_B (out, r) = A^T
            for n, layer in layers.items():
                layer.lora_A["default"].weight.copy_(B0[n][t].T)
                layer.lora_B["default"].weight.copy_(A0[n][t].T)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        t_wrap += time.perf_counter() - t0
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps, floor=0.1)
            opt.zero_grad(set_to_none=True)
            examples = [ex for tt, ex in rows[step] if tt == t]
            ids, mask = pad_batch(examples, pad_id, device)
            kl_rows = [i for i, ex in enumerate(examples) if not is_ce(ex.kind)]
            teacher_logits = None
            if kl_rows:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids[kl_rows], attention_mask=mask[kl_rows]).logits
            logits = peft_model(input_ids=ids, attention_mask=mask).logits
            parts = diff_loss_parts(logits, teacher_logits, examples, kl_rows, cfg.first_token_weight)
            (parts["ce"] + cfg.kl_weight * parts["kl"]).backward()
            opt.step()
            for k in PARTS:
                history[step][k][t] = parts[k].detach().cpu()
            if on_step is not None:
                on_step(t, step)
        t0 = time.perf_counter()
        with torch.no_grad():
            for n, layer in layers.items():
                B_out[n][t] = layer.lora_A["default"].weight.detach().T.cpu()
                A_out[n][t] = layer.lora_B["default"].weight.detach().T.cpu()
        model = peft_model.unload()  # the plain model back, LoRA modules removed (not merged)
        t_wrap += time.perf_counter() - t0
    del teacher
    tail = history[-min(5, len(history)):]
    final = {k: torch.stack([h[k] for h in tail]).mean(0).tolist() for k in PARTS}
    final["loss"] = [c + cfg.kl_weight * k for c, k in zip(final["ce"], final["kl"])]
    return ReferenceResult(A_out, B_out, history, final, t_copy, t_wrap)


class MergedDiffLinear(nn.Module):
    """A linear layer that runs each batch row with its own merged weight W + scale * (B @ A)^T,
    plus a shared trainable LoRA (the interpreter)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.merged: torch.Tensor | None = None  # (b, out, in)
        self.lora_A: nn.Parameter | None = None  # (r, out), the project's convention
        self.lora_B: nn.Parameter | None = None  # (in, r)
        self.lora_scale = 1.0

    def merge(self, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor) -> None:
        """Materialise every row's weight: A (b, r, out), B (b, in, r), scale (b,)."""
        delta = torch.bmm(B, A).transpose(1, 2) * scale.to(B.dtype)[:, None, None]  # (b, out, in)
        self.merged = self.base.weight.detach()[None].to(delta.dtype) + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.merged
        y = torch.bmm(x, W.transpose(1, 2).to(x.dtype)) if W is not None else self.base(x)
        if W is not None and self.base.bias is not None:
            y = y + self.base.bias
        if self.lora_A is not None:
            y = y + (x @ self.lora_B.to(x.dtype)) @ self.lora_A.to(x.dtype) * self.lora_scale
        return y


class ReferenceInterpreter:
    """The interpreter LoRA trained with every sample's diff merged into per-sample weights.

    Wraps `model`'s linear layers in place (`restore()` puts the originals back)."""

    def __init__(self, model: nn.Module, names: list[str], adapter: dict[str, torch.Tensor], alpha: float):
        """`adapter`: initial interpreter tensors `<module>.A` (r, out) / `<module>.B` (in, r)."""
        self.model, self.names = model, names
        self.layers: dict[str, MergedDiffLinear] = {}
        self.originals: dict[str, nn.Linear] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name)
            orig = getattr(parent, child)
            layer = MergedDiffLinear(orig)
            dev = orig.weight.device
            layer.lora_A = nn.Parameter(adapter[f"{n}.A"].detach().clone().float().to(dev))
            layer.lora_B = nn.Parameter(adapter[f"{n}.B"].detach().clone().float().to(dev))
            layer.lora_scale = alpha / layer.lora_A.shape[0]
            setattr(parent, child, layer)
            self.layers[n], self.originals[n] = layer, orig

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def loss(self, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], scale: torch.Tensor,
             examples: list[Example], pad_id: int) -> torch.Tensor:
        """Mean over rows of each row's mean label cross-entropy; row b carries diff b."""
        for n, layer in self.layers.items():
            layer.merge(A[n], B[n], scale)
        device = next(self.model.parameters()).device
        ids, mask = pad_batch(examples, pad_id, device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        for layer in self.layers.values():
            layer.merged = None
        logp = F.log_softmax(logits.float(), dim=-1)
        per_row = []
        for i, ex in enumerate(examples):
            pos = torch.arange(ex.answer_start - 1, len(ex.ids) - 1, device=device)
            tgt = torch.tensor(ex.ids[ex.answer_start:], device=device)
            per_row.append(-logp[i, pos, tgt].mean())
        return torch.stack(per_row).mean()

    def restore(self) -> None:
        for n, orig in self.originals.items():
            parent_name, _, child = n.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, orig)
