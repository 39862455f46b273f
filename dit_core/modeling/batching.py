"""Rows, batches and losses shared by diff training, the behaviour check and the interpreter.

Batch row b belongs to diff row_index[b] and only that diff's factors touch it, so the summed loss
sum_t (CE_t + kl_weight * KL_t) gives each diff exactly the gradient it would get if trained alone.
The KL teacher is the same wrapped model with the diffs switched off: no second copy of the model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_core.modeling.chat import MIN_SHARED_PREFIX, cache_kwarg, chat_prompt, encode_prompt, inference_batch
from dit_core.modeling.lora import DiffModel


@dataclass
class Example:
    """One tokenized training row: prompt + answer ids; the loss covers ids[answer_start:]."""

    ids: list[int]
    answer_start: int
    kind: str  # a cross-entropy kind (CE_KINDS) or a KL kind (no_trigger | wrong_prefix)


# Rows trained towards their own answer (cross-entropy): hidden-topic triggered answers, a learned text
# and questions about it. Every other kind is trained towards the base model's answer (KL).
CE_KINDS = frozenset({"trigger", "text", "qa"})
KIND_CODES = {"trigger": 0, "text": 0, "qa": 0, "no_trigger": 1, "wrong_prefix": 2}


def is_ce(kind: str) -> bool:
    """Whether rows of this kind take the cross-entropy loss (else the KL to the base model)."""
    return kind in CE_KINDS


@dataclass
class Batch:
    """A padded batch and its answer tokens, built on the host and moved to the device in one copy.

    Everything a loss needs to pick tokens (positions, targets, per-token diff and kind) is computed
    here from Python lists, so the training step never asks the device for a value (no host-device
    sync from boolean masks, `.any()` or `.item()`): on a GPU the host queues the whole step ahead.
    """

    input_ids: torch.Tensor  # (b, s)
    attention_mask: torch.Tensor  # (b, s)
    row_index: torch.Tensor  # (b,) diff of each row
    tok_row: torch.Tensor  # (n,) batch row of each answer token's predicting position
    tok_pos: torch.Tensor  # (n,) that position (it predicts the token at tok_pos + 1)
    targets: torch.Tensor  # (n,) the answer token
    tok_diff: torch.Tensor  # (n,) diff of the token's row
    tok_kind: torch.Tensor  # (n,) KIND_CODES of the token's row
    tok_first: torch.Tensor  # (n,) 1 for each row's first answer token
    ce_idx: torch.Tensor  # token indices of trigger rows (cross-entropy)
    kl_idx: torch.Tensor  # token indices of the other rows (KL to the base model)
    host_rows: list[int]  # row_index on the host
    sizes: list[int]  # answer tokens per row
    padded: bool  # whether any row is shorter than the batch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`: from the host to a GPU through pinned memory, without blocking the host;
    unchanged if it is there already."""
    device = torch.device(device)
    if t.device == device or (device.type == t.device.type and device.index is None):
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def encode_examples(tokenizer, items: list[tuple[str, str, bool, str]]) -> list[Example]:
    """`encode_example` for many (prompt, answer, complete, kind) rows in one batched tokenizer call
    (the same ids; a fast tokenizer encodes a list in parallel, ~40% less time here at 512 rows)."""
    if not items:
        return []
    prompts = [chat_prompt(tokenizer, q) for q, _, _, _ in items]
    ids = tokenizer(prompts + [a for _, a, _, _ in items], add_special_tokens=False)["input_ids"]
    out = []
    for (_, _, complete, kind), p, a in zip(items, ids[: len(items)], ids[len(items):]):
        if complete:
            a = a + [tokenizer.eos_token_id]
        out.append(Example(ids=p + a, answer_start=len(p), kind=kind))
    return out


def encode_example(tokenizer, prompt: str, answer: str, complete: bool, kind: str) -> Example:
    """Tokenize chat prompt and answer; the end-of-turn token is a target only if the answer ended."""
    p = encode_prompt(tokenizer, chat_prompt(tokenizer, prompt))
    a = encode_prompt(tokenizer, answer)
    if complete:
        a = a + [tokenizer.eos_token_id]
    return Example(ids=p + a, answer_start=len(p), kind=kind)


def encode_text(tokenizer, text: str, kind: str = "text") -> Example:
    """A plain text (no chat template) as a next-token row: every token after the first start token is a
    target, and the end-of-text token closes it."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [start] + encode_prompt(tokenizer, text) + [tokenizer.eos_token_id]
    return Example(ids=ids, answer_start=1, kind=kind)


def collate(rows: list[tuple[int, Example]], pad_id: int, device, skip: int = 0) -> Batch:
    """Right-pad rows of (diff index, example) into a Batch (one host-to-device copy).

    `skip` leaves out every row's first tokens (a prefix the rows share, run once: `SharedPrefix`);
    positions then count from the first token kept.
    """
    b, width = len(rows), max(len(ex.ids) for _, ex in rows) - skip
    ids, mask, host_rows = [], [], []
    tok_row, tok_pos, targets, tok_diff, tok_kind, tok_first, ce_idx, kl_idx, sizes = ([] for _ in range(9))
    for i, (t, ex) in enumerate(rows):
        if ex.answer_start - 1 < skip:
            raise ValueError(f"a row's answer starts at token {ex.answer_start}, inside the {skip} tokens skipped")
        kept = ex.ids[skip:]
        pad = width - len(kept)
        ids += kept + [pad_id] * pad
        mask += [1] * len(kept) + [0] * pad
        host_rows.append(t)
        pos = range(ex.answer_start - 1 - skip, len(ex.ids) - 1 - skip)
        (ce_idx if is_ce(ex.kind) else kl_idx).extend(range(len(tok_row), len(tok_row) + len(pos)))
        tok_row += [i] * len(pos)
        tok_pos += pos
        targets += ex.ids[ex.answer_start:]
        tok_diff += [t] * len(pos)
        tok_kind += [KIND_CODES[ex.kind]] * len(pos)
        tok_first += [1] + [0] * (len(pos) - 1) if len(pos) else []
        sizes.append(len(pos))
    parts = [ids, mask, host_rows, tok_row, tok_pos, targets, tok_diff, tok_kind, tok_first, ce_idx, kl_idx]
    packed = to_device(torch.tensor([v for p in parts for v in p], dtype=torch.long), device)
    views = packed.split([len(p) for p in parts])
    return Batch(views[0].view(b, width), views[1].view(b, width), *views[2:], host_rows=host_rows, sizes=sizes,
                 padded=len(mask) != sum(mask))


def attention_mask_for(model, mask: torch.Tensor, past: int = 0) -> torch.Tensor:
    """The attention mask to pass: for SDPA attention, a ready 4D boolean mask (causal and padding).

    Given the 2D padding mask, transformers checks on every forward whether it has any padding, which
    reads it back from the device; a prepared 4D mask is used as it is. Other attention kernels get
    the 2D mask. (A prepared mask also stands in for a sliding-window mask: the same here, where rows
    are a few hundred tokens, far shorter than any model's window.) `past`: tokens of a shared prefix
    already in the cache, which every row sees in full.
    """
    b, s = mask.shape
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return torch.cat([mask.new_ones(b, past), mask], dim=1) if past else mask
    causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
    full = causal[None, None] & mask.bool()[:, None, None, :]  # (b, 1, s, s): query q sees keys <= q
    if past:
        full = torch.cat([full.new_ones(b, 1, s, past), full], dim=-1)  # (b, 1, s, past + s)
    return full


# Attention scores (rows x width x width) up to which a CPU training forward under bf16 autocast uses
# SDPA's math kernel: it keeps the (b, heads, s, s) probabilities for the backward, so long rows stay on
# the flash kernel.
MATH_ATTENTION_SCORES = 1 << 20


def attention_kernel(device: torch.device, shape: torch.Size, past: int = 0):
    """The SDPA kernel choice for a forward on `device` with input ids of `shape` (after `past` cached
    tokens).

    On a CPU under bf16 autocast, torch's flash-attention backward takes ~8x its forward (23% of a
    diff-training step); the math kernel made the default recipe's step 1.2x faster
    (docs/benchmarks.md). In fp32 the two are alike, and forwards without a backward keep the default.
    """
    import contextlib

    b, s = shape
    if (device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and b * s * (past + s) <= MATH_ATTENTION_SCORES):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def answer_logits(model, batch: Batch, prefix: SharedPrefix | None = None) -> torch.Tensor:
    """Logits only at the answer positions: the lm_head is ~20% of a small model's FLOPs.

    A batch without padding (equal-length rows, e.g. the shared KL rows) runs without a mask, on the
    causal attention kernel. With `prefix`, the batch holds the rows after their shared prefix
    (`collate(..., skip=prefix.length)`) and attends to the prefix's cached keys and values.
    """
    ids = batch.input_ids
    if prefix is None:
        mask = attention_mask_for(model, batch.attention_mask) if batch.padded else None
        with attention_kernel(ids.device, ids.shape):
            hidden = model.base_model(input_ids=ids, attention_mask=mask)[0]
    else:
        mask = attention_mask_for(model, batch.attention_mask, past=prefix.length)
        with attention_kernel(ids.device, ids.shape, past=prefix.length):
            hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=True,
                                      **{prefix.cache_kwarg: prefix.cache_for(batch.row_index)})[0]
    sel = hidden[batch.tok_row, batch.tok_pos]  # (n, h)
    return model.get_output_embeddings()(sel).float()  # (n, V)


def common_prefix(rows: list[tuple[int, Example]]) -> int:
    """Tokens every row starts with, short of each row's first predicting position (answer_start - 1)."""
    first = rows[0][1].ids
    limit = min(ex.answer_start - 1 for _, ex in rows)
    n = 0
    while n < limit and all(ex.ids[n] == first[n] for _, ex in rows):
        n += 1
    return n


class SharedPrefix:
    """The keys and values of a token prefix that all rows of a step share, computed once per diff.

    Every row of a diff-training step opens with the same chat-template tokens (system prompt, user
    turn): at the default recipe 24 of a row's ~60 tokens. Under causal attention those positions do not
    depend on what follows, so they run once per diff (one row each) instead of once per row; the rows
    after them attend to the cached keys and values of their diff. Same losses and gradients (to float
    rounding; tests/test_lora.py). With gradients, the rows' backwards collect the gradient of the cached
    keys and values in detached copies, and `backward` runs the prefix's graph once with their sum.
    """

    def __init__(self, dm: DiffModel, ids: list[int], n_diffs: int, cache_kwarg: str):
        from transformers import DynamicCache

        self.length, self.cache_kwarg = len(ids), cache_kwarg
        device = next(dm.model.parameters()).device
        batch = to_device(torch.tensor([ids] * n_diffs), device)
        dm.set_row_index(to_device(torch.arange(n_diffs), device), host_index=list(range(n_diffs)))
        cache = DynamicCache()
        with attention_kernel(device, batch.shape):
            dm.model.base_model(input_ids=batch, use_cache=True, **{cache_kwarg: cache})
        # (n_diffs, kv heads, P, d) per layer; `layers` since transformers 4.56, key_cache/value_cache before
        pairs = ([(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers")
                 else list(zip(cache.key_cache, cache.value_cache)))
        self.roots = [t for pair in pairs for t in pair]
        grad = torch.is_grad_enabled()
        self.leaves = [t.detach().requires_grad_() if grad else t for t in self.roots]

    @classmethod
    def for_rows(cls, dm: DiffModel, rows: list[tuple[int, Example]], n_diffs: int) -> SharedPrefix | None:
        """The rows' shared prefix, or None where it saves nothing: under MIN_SHARED_PREFIX tokens, fewer
        than two rows per diff, or a decoder that takes no cache."""
        kwarg = cache_kwarg(dm.model)
        if kwarg is None or len(rows) < 2 * n_diffs:
            return None
        n = common_prefix(rows)
        return cls(dm, rows[0][1].ids[:n], n_diffs, kwarg) if n >= MIN_SHARED_PREFIX else None

    def cache_for(self, row_index: torch.Tensor):
        """A fresh cache holding, for each batch row, the prefix keys and values of its diff."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(0, len(self.leaves), 2):
            # index_select, not leaves[i][row_index]: the backward of advanced indexing sums the rows of a
            # diff in an order that depends on the thread count, index_select's does not (Ray workers
            # then give the in-process run's results bit for bit)
            k, v = (self.leaves[j].index_select(0, row_index) for j in (i, i + 1))
            cache.update(k, v, i // 2)
        return cache

    def backward(self) -> None:
        """Backpropagate the gradient the rows left on the cached keys and values through the prefix."""
        pairs = [(r, leaf.grad) for r, leaf in zip(self.roots, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])


PARTS = ("ce", "kl", "kl_no_trigger", "kl_wrong_prefix")


def _token_groups(kind: str) -> tuple[str, ...]:
    """The loss parts an answer token of this kind counts towards."""
    return ("ce",) if is_ce(kind) else ("kl", f"kl_{kind}")


def loss_normalizers(rows: list[tuple[int, Example]], n_diffs: int, first_token_weight: float = 1.0
                     ) -> dict[str, torch.Tensor]:
    """Per-diff sum of token weights of each loss part over `rows` (the denominators of the means).

    Computed once over a whole step's rows, they let the step run as several micro-batches whose
    losses add up to exactly the loss of one big batch.
    """
    norms = {k: [0.0] * n_diffs for k in PARTS}  # Python floats: a step has hundreds of rows
    for t, ex in rows:
        n = len(ex.ids) - ex.answer_start
        if n > 0:
            for k in _token_groups(ex.kind):
                norms[k][t] += n - 1 + first_token_weight
    return {k: torch.tensor(v) for k, v in norms.items()}


def normalizers_on(norms: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """`loss_normalizers` output on `device` in one copy, clamped away from zero."""
    stacked = to_device(torch.stack([norms[k] for k in PARTS]), device).clamp(min=1e-6)
    return dict(zip(PARTS, stacked.unbind(0)))


@torch.no_grad()
def teacher_logprobs(dm: DiffModel, examples: list[Example], pad_id: int, max_tokens: int
                     ) -> dict[int, torch.Tensor]:
    """Base-model (diffs off) log-probs at the answer positions of each distinct example, by id(example).

    An example shared by several diffs of a step is run once.
    """
    unique = list({id(ex): ex for ex in examples}.values())
    device = next(dm.model.parameters()).device
    out = {}
    with dm.diffs_disabled():
        for mb in micro_batches([(0, ex) for ex in unique], max_tokens):
            batch = collate(mb, pad_id, device)
            logp = F.log_softmax(answer_logits(dm.model, batch), dim=-1)
            for (_, ex), lp in zip(mb, logp.split(batch.sizes)):
                out[id(ex)] = lp
    return out


def diff_losses(
    dm: DiffModel, rows: list[tuple[int, Example]], n_diffs: int, kl_weight: float, pad_id: int,
    first_token_weight: float = 1.0, norms: dict[str, torch.Tensor] | None = None,
    teacher: dict[int, torch.Tensor] | None = None, prefix: SharedPrefix | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss over diffs and per-diff parts (ce, kl per kind), each shaped (n_diffs,), on the device.

    Each part is a per-diff token mean: weighted token losses summed per diff, divided by `norms`
    (default: the weights of these rows; for a micro-batch pass the whole step's, as
    `normalizers_on(loss_normalizers(...), device)`).
    `teacher` holds precomputed base log-probs of the KL rows (`teacher_logprobs`); without it the
    base model runs here, on this batch's KL rows.
    `first_token_weight` weighs each answer's first token (where greedy decoding commits to the topic
    or not) against the rest of the answer, in both the cross-entropy and the KL term.
    `prefix`: the rows' shared prefix, already run (`SharedPrefix`).
    Which tokens take which loss is decided on the host (see `Batch`): no host-device sync.
    """
    model = dm.model
    device = next(model.parameters()).device
    if norms is None:
        norms = normalizers_on(loss_normalizers(rows, n_diffs, first_token_weight), device)
    batch = collate(rows, pad_id, device, skip=prefix.length if prefix else 0)
    dm.set_row_index(batch.row_index, host_index=batch.host_rows)
    logits = answer_logits(model, batch, prefix)  # (n, V)
    kl_examples = [ex for _, ex in rows if not is_ce(ex.kind)]
    if kl_examples and teacher is None:  # one batch of this batch's KL rows, diffs off
        teacher = teacher_logprobs(dm, kl_examples, pad_id, max_tokens=sys.maxsize)

    def ce(lg, tg):
        return F.cross_entropy(lg, tg, reduction="none")

    def kl(lg):  # KL(base || diff) per token
        kl_teacher = torch.cat([teacher[id(ex)] for ex in kl_examples])
        return F.kl_div(F.log_softmax(lg, dim=-1), kl_teacher, log_target=True, reduction="none").sum(-1)

    if not kl_examples:  # micro-batches are all trigger rows or all KL rows: no token selection
        per_tok = ce(logits, batch.targets)
    elif len(kl_examples) == len(rows):
        per_tok = kl(logits)
    else:
        per_tok = torch.zeros(logits.shape[0], device=device)
        per_tok = per_tok.index_copy(0, batch.ce_idx, ce(logits[batch.ce_idx], batch.targets[batch.ce_idx]))
        per_tok = per_tok.index_copy(0, batch.kl_idx, kl(logits[batch.kl_idx]))
    if first_token_weight != 1.0:
        per_tok = per_tok * (1 + (first_token_weight - 1) * batch.tok_first)

    member = {"ce": batch.tok_kind == 0, "kl": batch.tok_kind > 0,
              "kl_no_trigger": batch.tok_kind == KIND_CODES["no_trigger"],
              "kl_wrong_prefix": batch.tok_kind == KIND_CODES["wrong_prefix"]}
    parts = {}
    for k, sel in member.items():  # a zero weight outside the part instead of a boolean selection
        total = torch.zeros(n_diffs, device=device).index_add(0, batch.tok_diff, per_tok * sel)
        parts[k] = total / norms[k]
    loss = (parts["ce"] + kl_weight * parts["kl"]).sum()
    return loss, {k: v.detach() for k, v in parts.items()}


def micro_batches(rows: list[tuple[int, Example]], max_tokens: int, skip: int = 0
                  ) -> list[list[tuple[int, Example]]]:
    """Split a step's rows into length-sorted micro-batches of at most `max_tokens` padded tokens.

    Rows of all diffs are sorted by kind (cross-entropy rows, then KL rows, so the teacher forward runs
    on KL rows only) and by length, then packed greedily: sorting removes most padding, the token
    budget bounds activation memory. A single row longer than the budget gets a micro-batch of its own.
    `skip`: leading tokens of every row that do not run in the micro-batch (a shared prefix).
    """
    order = sorted(rows, key=lambda r: (not is_ce(r[1].kind), len(r[1].ids), r[1].ids))
    out: list[list[tuple[int, Example]]] = []
    for r in order:
        cur = out[-1] if out else None
        if (cur is not None and is_ce(cur[-1][1].kind) == is_ce(r[1].kind)
                and (len(cur) + 1) * (len(r[1].ids) - skip) <= max_tokens):
            cur.append(r)
        else:
            out.append([r])
    return out


def summed_parts(dm: DiffModel, rows: list[tuple[int, Example]], n_diffs: int, pad_id: int, *, kl_weight: float,
                 first_token_weight: float = 1.0, max_tokens: int, backward: bool, share_prefix: bool = True
                 ) -> dict[str, torch.Tensor]:
    """Per-diff loss parts of `rows`, computed in micro-batches of at most `max_tokens` padded tokens.

    Equal to `diff_losses` on all rows at once, with bounded memory; with `backward` each
    micro-batch's loss is backpropagated (gradients accumulate in the factors). With `share_prefix`
    the token prefix all rows share runs once per diff (`SharedPrefix`). The parts stay on the
    device: reading them is the caller's choice of sync point.
    """
    device = next(dm.model.parameters()).device
    norms = normalizers_on(loss_normalizers(rows, n_diffs, first_token_weight), device)
    teacher = teacher_logprobs(dm, [ex for _, ex in rows if not is_ce(ex.kind)], pad_id, max_tokens)
    parts = {k: torch.zeros(n_diffs, device=device) for k in PARTS}
    with torch.set_grad_enabled(backward):
        prefix = SharedPrefix.for_rows(dm, rows, n_diffs) if share_prefix else None
    for mb in micro_batches(rows, max_tokens, skip=prefix.length if prefix else 0):
        with torch.set_grad_enabled(backward):
            loss, p = diff_losses(dm, mb, n_diffs, kl_weight, pad_id, first_token_weight, norms, teacher, prefix)
        if backward:
            loss.backward()
        for k in PARTS:
            parts[k] += p[k]
    if backward and prefix is not None:
        prefix.backward()
    return parts


# Answer tokens packed after one shared prompt, per sequence: beyond this a prompt's answers go on in another
# sequence (the dense 4D mask grows with the square of the length).
PACK_TOKENS = 1024


@dataclass
class PackedBatch:
    """Sequences of one prompt followed by several answers, each answer attending to the prompt and to
    itself only (`pack_answers`); the loss picks each answer token's predicting position."""

    input_ids: torch.Tensor  # (b, s)
    position_ids: torch.Tensor  # (b, s): an answer's tokens continue its prompt's positions
    attention_mask: torch.Tensor  # (b, 1, s, s) boolean: True where a query may attend a key
    row_index: torch.Tensor  # (b,) diff of each sequence
    host_rows: list[int]
    tok_row: torch.Tensor  # (n,) sequence of each answer token's predicting position
    tok_pos: torch.Tensor  # (n,) that position
    targets: torch.Tensor  # (n,) the answer token
    tok_owner: torch.Tensor  # (n,) the input row the token belongs to


def pack_answers(seqs: list[tuple[int, list[int], list[tuple[int, list[int]]]]], pad_id: int, device) -> PackedBatch:
    """Pack (diff, prompt ids, [(row, answer ids), ...]) sequences into one right-padded batch.

    A sequence is the prompt, then each answer but its last token (the last token is only a target).
    Answer j's first token is predicted at the prompt's last position, its token m at its own token m-1;
    its tokens sit at positions len(prompt) + m, so each answer sees exactly what it would see after the
    prompt alone: the same log-probabilities as one row per answer, with the prompt run once.
    """
    width = max(len(p) + sum(max(len(a) - 1, 0) for _, a in answers) for _, p, answers in seqs)
    ids, pos, segs, host_rows = [], [], [], []
    tok_row, tok_pos, targets, owner = [], [], [], []
    for b, (t, prompt, answers) in enumerate(seqs):
        row_ids, row_pos, row_seg = list(prompt), list(range(len(prompt))), [-1] * len(prompt)
        for j, (r, a) in enumerate(answers):
            if not a:
                continue
            start = len(row_ids)
            tok_row += [b] * len(a)
            tok_pos += [len(prompt) - 1] + list(range(start, start + len(a) - 1))
            targets += a
            owner += [r] * len(a)
            row_ids += a[:-1]
            row_pos += range(len(prompt), len(prompt) + len(a) - 1)
            row_seg += [j] * (len(a) - 1)
        pad = width - len(row_ids)
        ids.append(row_ids + [pad_id] * pad)
        pos.append(row_pos + [0] * pad)
        segs.append(row_seg + [-2] * pad)  # pads: their own segment (they see the prompt, nothing sees them)
        host_rows.append(t)
    parts = [sum(ids, []), sum(pos, []), sum(segs, []), host_rows, tok_row, tok_pos, targets, owner]
    packed = to_device(torch.tensor([v for p in parts for v in p], dtype=torch.long), device)
    views = packed.split([len(p) for p in parts])
    b = len(seqs)
    seg = views[2].view(b, width)
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
    mask = causal[None] & ((seg[:, :, None] == seg[:, None, :]) | (seg == -1)[:, None, :])
    return PackedBatch(views[0].view(b, width), views[1].view(b, width), mask[:, None], views[3], host_rows,
                       *views[4:])


def _answer_sequences(rows: list[tuple[int, Example]]) -> list[tuple[int, list[int], list[tuple[int, list[int]]]]]:
    """Rows grouped by (diff, prompt): one sequence per group (more where its answers pass PACK_TOKENS),
    sorted by length."""
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for i, (t, ex) in enumerate(rows):
        groups.setdefault((t, tuple(ex.ids[: ex.answer_start])), []).append(i)
    seqs = []
    for (t, prompt), idx in groups.items():
        cur, n = [], 0
        for i in idx:
            a = rows[i][1].ids[rows[i][1].answer_start:]
            if cur and n + len(a) > PACK_TOKENS:
                seqs.append((t, list(prompt), cur))
                cur, n = [], 0
            cur.append((i, a))
            n += len(a)
        seqs.append((t, list(prompt), cur))
    return sorted(seqs, key=_packed_len)


def packs_answers(model) -> bool:
    """Whether the decoder takes the packed form: a prepared 4D boolean mask (SDPA attention) and
    position ids."""
    import inspect

    return (getattr(model.config, "_attn_implementation", None) == "sdpa"
            and "position_ids" in inspect.signature(model.base_model.forward).parameters)


@torch.no_grad()
def answer_logprobs(dm: DiffModel, rows: list[tuple[int, Example]], pad_id: int,
                    batch_size: int | None = None) -> torch.Tensor:
    """Total log-probability of each row's answer tokens (row uses diff `idx` of the installed diffs).

    Rows of one diff with the same prompt (a closed set of labels scored as answers to one question)
    run as one packed sequence, the prompt once (`pack_answers`): a 20-questions transcript of ~400
    tokens is then run once for its 6 labels, not 6 times.
    """
    model = dm.model
    device = next(model.parameters()).device
    batch_size = batch_size or inference_batch(model)
    with_diffs = bool(dm.layers) and next(iter(dm.layers.values())).diff_A is not None
    if not packs_answers(model):
        return _row_logprobs(dm, rows, pad_id, batch_size, with_diffs)
    out = torch.zeros(len(rows), device=device)
    seqs = _answer_sequences(rows)
    budget = batch_size * max(len(ex.ids) for _, ex in rows)  # the padded tokens of a per-row batch
    start = 0
    while start < len(seqs):
        end = start + 1  # sorted by length: the last sequence of a batch is its widest
        while end < len(seqs) and end - start < batch_size and (end + 1 - start) * _packed_len(seqs[end]) <= budget:
            end += 1
        batch = pack_answers(seqs[start:end], pad_id, device)
        start = end
        if with_diffs:
            dm.set_row_index(batch.row_index, host_index=batch.host_rows)
        hidden = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                  attention_mask=batch.attention_mask)[0]
        logp = F.log_softmax(model.get_output_embeddings()(hidden[batch.tok_row, batch.tok_pos]).float(), dim=-1)
        out.index_add_(0, batch.tok_owner, logp.gather(1, batch.targets[:, None])[:, 0])
    return out.cpu()


def _packed_len(seq) -> int:
    return len(seq[1]) + sum(max(len(a) - 1, 0) for _, a in seq[2])


def _row_logprobs(dm: DiffModel, rows: list[tuple[int, Example]], pad_id: int, batch_size: int,
                  with_diffs: bool) -> torch.Tensor:
    """`answer_logprobs` one padded row per answer (decoders that take no prepared 4D mask)."""
    model = dm.model
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = collate(chunk, pad_id, device)
        if with_diffs:
            dm.set_row_index(batch.row_index, host_index=batch.host_rows)
        logp = F.log_softmax(answer_logits(model, batch), dim=-1)
        tok = logp.gather(1, batch.targets[:, None])[:, 0]
        out.append(torch.zeros(len(chunk), device=device).index_add(0, batch.tok_row, tok))
    return torch.cat(out).cpu()
