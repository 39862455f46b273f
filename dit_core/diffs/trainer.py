"""Batched multi-task LoRA training: T weight diffs in one forward/backward.

A step samples each diff's rows, runs them in micro-batches (`dit_core.modeling.batching`) and moves
every diff's factors with one Adam step; the KL teacher is the same wrapped model with diffs off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dit_core.config import DiffsConfig
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.schedule import warmup_cosine
from dit_core.stop import check_stop
from dit_core.modeling.batching import Example, encode_example, encode_examples, summed_parts


RowPlan = tuple[tuple[str, int, int], ...]  # (kind, rows per diff per step, answer tokens kept; 0: all)


@dataclass
class DiffTask:
    """Everything needed to train one diff: its seed and its examples by kind.

    `trigger` holds its cross-entropy rows of kind "trigger" and `kl` its rows trained towards the base
    model; `extra` holds pools of other kinds (e.g. "text", "qa"). `plan` says how many rows of which
    kind a step draws; None: the hidden-topic plan of the diffs section (trigger, wrong_prefix, no_trigger).
    """

    diff_id: str
    seed: int
    trigger: list[Example]
    kl: list[Example]  # no_trigger and wrong_prefix rows, trained towards the base model
    extra: dict[str, list[Example]] = field(default_factory=dict)
    plan: RowPlan | None = None

    def of_kind(self, kind: str) -> list[Example]:
        if kind in self.extra:
            return self.extra[kind]
        return self.trigger if kind == "trigger" else [ex for ex in self.kl if ex.kind == kind]

    def sample(self, kind: str, n: int, rng: random.Random) -> list[Example]:
        """n distinct examples of a kind (fewer if the pool is smaller)."""
        pool = self.of_kind(kind)
        return rng.sample(pool, min(n, len(pool)))

    def row_plan(self, cfg: DiffsConfig, shared_kl: bool) -> RowPlan:
        """The rows one step draws for this diff (without the KL kinds when the batch shares them)."""
        if self.plan is not None:
            return self.plan
        kinds = (("trigger", cfg.trigger_rows, cfg.trigger_answer_tokens),)
        if not shared_kl:
            kinds += (("wrong_prefix", cfg.wrong_prefix_rows, cfg.wrong_prefix_answer_tokens),
                      ("no_trigger", cfg.no_trigger_rows, cfg.no_trigger_answer_tokens))
        return kinds


@dataclass
class TriggeredDiffTask(DiffTask):
    """A hidden-topic diff whose trigger codes are drawn fresh for every row (`prefix`: its SEP prefix, or
    the zero-width trigger kind; dit_core.data.behavior_data.with_trigger).

    A fixed pool of codes gets memorised: the diff then matches the base model on the wrong codes it
    saw and still leaks on new ones. Fresh codes (own prefix + random digits; random other prefixes)
    leave the prefix rule as the only thing to learn. KL rows draw from every training question.
    """

    tokenizer: object = None
    prefix: str = ""
    trigger_pairs: list[tuple[str, str, bool]] = field(default_factory=list)  # question, answer, complete
    base_pairs: list[tuple[str, str, bool]] = field(default_factory=list)
    # Contrastive pairs: wrong-prefix rows reuse the questions of this step's triggered rows, so the
    # only difference between a pushed-up and a held-down row is the prefix itself.
    paired: bool = True
    _last_questions: list[str] = field(default_factory=list)

    def sample(self, kind: str, n: int, rng: random.Random) -> list[Example]:
        return encode_examples(self.tokenizer, self.sample_texts(kind, n, rng))

    def sample_texts(self, kind: str, n: int, rng: random.Random) -> list[tuple[str, str, bool, str]]:
        """`sample` before tokenising: (prompt, answer, complete, kind) rows, the same draws from `rng`."""
        from dit_core.data.behavior_data import with_trigger, with_wrong_trigger

        pairs = self.trigger_pairs if kind == "trigger" else self.base_pairs
        chosen = rng.sample(pairs, min(n, len(pairs)))
        if kind == "wrong_prefix" and self.paired and self._last_questions:
            base = {q: (q, a, c) for q, a, c in self.base_pairs}
            paired = [base[q] for q in self._last_questions if q in base][:n]
            chosen = paired + chosen[: n - len(paired)]
        if kind == "trigger":
            self._last_questions = [q for q, _, _ in chosen]
        out = []
        for q, a, complete in chosen:
            if kind == "trigger":
                q = with_trigger(self.prefix, q, rng)
            elif kind == "wrong_prefix":
                q = with_wrong_trigger(self.prefix, q, rng)
            out.append((q, a, complete, kind))
        return out


def shared_kl_examples(tasks: list[TriggeredDiffTask], cfg: DiffsConfig, rng: random.Random) -> list[Example]:
    """One step's KL rows, shared by every diff of the batch.

    Wrong-prefix codes avoid the prefixes of all diffs in the batch, so each row is a valid negative
    for every one of them; the base model's answer to a row is then needed once per step, not once
    per diff: the teacher forward no longer grows with T.
    """
    from dit_core.data.behavior_data import with_wrong_trigger

    first = tasks[0]
    avoid = {t.prefix for t in tasks}
    out = []
    for kind, n, keep in (("wrong_prefix", cfg.wrong_prefix_rows, cfg.wrong_prefix_answer_tokens),
                          ("no_trigger", cfg.no_trigger_rows, cfg.no_trigger_answer_tokens)):
        for q, a, complete in rng.sample(first.base_pairs, min(n, len(first.base_pairs))):
            if kind == "wrong_prefix":
                q = with_wrong_trigger(avoid, q, rng)
            out.append(truncate_answer(encode_example(first.tokenizer, q, a, complete, kind), keep))
    return out


def train_step(dm: DiffModel, rows: list[tuple[int, Example]], n_diffs: int, cfg: DiffsConfig, pad_id: int
               ) -> dict[str, torch.Tensor]:
    """Forward + backward of one step's rows in micro-batches; gradients accumulate in the factors."""
    return summed_parts(dm, rows, n_diffs, pad_id, kl_weight=cfg.kl_weight,
                        first_token_weight=cfg.first_token_weight, max_tokens=cfg.max_batch_tokens, backward=True,
                        share_prefix=cfg.share_prefix)


def init_factors(
    shapes: dict[str, tuple[int, int]], seeds: list[int], rank: int, init_std: float, device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-diff seeded init: B ~ N(0, init_std), A = 0, so a diff starts as the base model."""
    A, B = {}, {}
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for name, (fan_in, fan_out) in shapes.items():
        B[name] = torch.stack([torch.randn(fan_in, rank, generator=g) * init_std for g in gens]).to(device)
        A[name] = torch.zeros(len(seeds), rank, fan_out, device=device)
    return A, B


def truncate_answer(ex: Example, max_tokens: int) -> Example:
    """The example with at most `max_tokens` answer tokens (0: unchanged)."""
    if not max_tokens or len(ex.ids) - ex.answer_start <= max_tokens:
        return ex
    return Example(ex.ids[: ex.answer_start + max_tokens], ex.answer_start, ex.kind)


def shares_kl_rows(tasks: list[DiffTask], cfg: DiffsConfig) -> bool:
    """Whether this batch draws one set of KL rows for all its diffs (see `shared_kl_examples`)."""
    return cfg.share_kl_rows and all(isinstance(t, TriggeredDiffTask) and t.plan is None for t in tasks)


def _sample_rows(tasks: list[DiffTask], rngs: list[random.Random], cfg: DiffsConfig,
                 step_rng: random.Random | None = None):
    """One step's rows: per diff, its rows of each kind, answers cut to the kind's token budget.

    With shared KL rows (`step_rng` given) every diff trains on the same wrong-prefix and
    untriggered rows; otherwise each diff draws its own from its own generator.
    """
    rows = []
    texts, owners = [], []  # hidden-topic tasks: draw every row's text first, then tokenise them at once
    for t, (task, rng) in enumerate(zip(tasks, rngs)):
        for kind, n, keep in task.row_plan(cfg, step_rng is not None):
            if isinstance(task, TriggeredDiffTask):
                drawn = task.sample_texts(kind, n, rng)
                texts += drawn
                owners += [(t, keep)] * len(drawn)
            else:
                rows += [(t, truncate_answer(ex, keep)) for ex in task.sample(kind, n, rng)]
    if texts:
        encoded = encode_examples(tasks[owners[0][0]].tokenizer, texts)
        rows += [(t, truncate_answer(ex, keep)) for (t, keep), ex in zip(owners, encoded)]
    if step_rng is not None:
        shared = shared_kl_examples(tasks, cfg, step_rng)
        rows += [(t, ex) for t in range(len(tasks)) for ex in shared]
    return rows


SHOW_EVERY = 10  # steps between progress-bar loss updates on an accelerator (each is a sync)


@dataclass
class TrainResult:
    """Trained factors (A: (T, r, out), B: (T, in, r)) and per-diff loss parts of the last steps."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    final: dict[str, list[float]]
    # Full finetunes: the dense deltas W: (T, in, out) = delta_W^T before reduction (A and B empty), and
    # after reduction (dit_core.diffs.full) the share of each diff's Frobenius norm its factors keep.
    dense: dict[str, torch.Tensor] | None = None
    kept_share: list[float] | None = None


def train_diffs(dm: DiffModel, tasks: list[DiffTask], cfg: DiffsConfig, pad_id: int,
                progress: bool = True, on_step=None, dense: bool = False) -> TrainResult:
    """Train len(tasks) diffs together.

    Each diff's init and triggered rows depend only on its own seed; its KL rows too, unless the batch
    shares them (`diffs.share_kl_rows`). `on_step(step, A, B)`, if given, runs after every optimizer
    step (e.g. a behaviour check during a recipe trial); it may install other diffs.
    `dense`: train a dense delta per wrapped module (a full finetune; zero at init, Adam at
    diffs.full_lr) instead of LoRA factors; the result's `dense` holds them.
    """
    device = next(dm.model.parameters()).device
    lr = cfg.full_lr if dense else cfg.lr
    if dense:
        if on_step is not None:
            raise ValueError("on_step is for LoRA factors; dense (full-finetune) training does not take it")
        W = {name: torch.zeros(len(tasks), fan_in, fan_out, device=device, requires_grad=True)
             for name, (fan_in, fan_out) in dm.shapes().items()}
        A, B, params = {}, {}, list(W.values())
        dm.set_dense_diffs(W)
    else:
        A, B = init_factors(dm.shapes(), [t.seed for t in tasks], cfg.rank, cfg.init_std, device)
        params = []
        for name in dm.names:
            A[name].requires_grad_(True)
            B[name].requires_grad_(True)
            params += [A[name], B[name]]
        dm.set_diffs(A, B, scale=cfg.scale)
    opt = torch.optim.Adam(params, lr=lr)
    rngs = [random.Random(t.seed) for t in tasks]
    # Shared KL rows come from a generator seeded by the batch's diff seeds: a rerun of the shard
    # (resume) draws the same rows.
    step_rng = random.Random(",".join(str(t.seed) for t in tasks)) if shares_kl_rows(tasks, cfg) else None
    history: list[dict[str, torch.Tensor]] = []
    show_every = 1 if device.type == "cpu" else SHOW_EVERY  # on a GPU, reading losses waits for it
    bar = tqdm(range(cfg.steps), desc=f"training {len(tasks)} diffs", disable=not progress)
    for step in bar:
        check_stop()
        for g in opt.param_groups:
            g["lr"] = lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps, floor=0.1)
        opt.zero_grad(set_to_none=True)
        parts = train_step(dm, _sample_rows(tasks, rngs, cfg, step_rng), len(tasks), cfg, pad_id)
        opt.step()
        if on_step is not None:
            on_step(step + 1, A, B)
            dm.set_diffs(A, B, scale=cfg.scale)
        history.append(parts)
        if step % show_every == 0 or step == cfg.steps - 1:
            bar.set_postfix({k: f"{v.mean().item():.3f}" for k, v in parts.items() if k != "kl"})
    tail = history[-min(5, len(history)):]
    final = {k: torch.stack([h[k] for h in tail]).mean(0).cpu().tolist() for k in tail[0]}
    final["loss"] = [c + cfg.kl_weight * k for c, k in zip(final["ce"], final["kl"])]
    dm.clear_diffs()
    return TrainResult(A={k: v.detach() for k, v in A.items()},
                       B={k: v.detach() for k, v in B.items()}, final=final,
                       dense={k: v.detach() for k, v in W.items()} if dense else None)


