"""Factored diffs equal their materialised form; batched training gives per-diff gradients."""

import random

import pytest
import torch

from dit_core.diffs.trainer import init_factors, train_diffs, train_step
from dit_core.modeling.batching import diff_losses, micro_batches, summed_parts
from dit_core.modeling.lora import DiffModel, linear_module_names
from dit_core.testing.syncs import SyncOps
from dit_core.testing.tiny import random_token_tasks
from conftest import section


@pytest.fixture()
def dm(tiny_model_dir):
    from dit_core.modeling.models import load_model

    return DiffModel(load_model(tiny_model_dir, "cpu", "float32").model)


def _random_diffs(dm, n, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = {k: torch.randn(n, rank, o, generator=g) * 0.1 for k, (i, o) in dm.shapes().items()}
    B = {k: torch.randn(n, i, rank, generator=g) * 0.1 for k, (i, o) in dm.shapes().items()}
    return A, B


def test_wraps_every_decoder_linear_once(dm):
    assert len(dm.names) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert "lm_head" not in dm.names
    again = DiffModel(dm.model)  # re-wrapping an already wrapped model changes nothing
    assert again.names == dm.names
    assert linear_module_names(dm.model, r"mlp\.") == [n for n in dm.names if ".mlp." in n]


@pytest.mark.parametrize("scale", [0.7, 1.0])  # 1.0 skips the scale multiply: same result
def test_factored_equals_materialised(dm, scale):
    ids = torch.randint(3, 500, (3, 7))
    A, B = _random_diffs(dm, 3)
    dm.set_diffs(A, B, scale=scale)
    with torch.no_grad():
        factored = dm.model(ids).logits
    dm.clear_diffs()
    for t in range(3):
        originals = {}
        for name, layer in dm.layers.items():
            w = layer.base_layer.weight
            originals[name] = w.data.clone()
            w.data += (B[name][t] @ A[name][t]).T * scale  # delta_W = (B @ A)^T * scale
        with torch.no_grad():
            materialised = dm.model(ids[t : t + 1]).logits
        for name, layer in dm.layers.items():
            layer.base_layer.weight.data.copy_(originals[name])
        torch.testing.assert_close(factored[t : t + 1], materialised, atol=1e-5, rtol=1e-5)


def test_diffs_disabled_is_the_base_model(dm):
    ids = torch.randint(3, 500, (2, 5))
    with torch.no_grad():
        base = dm.model(ids).logits
        A, B = _random_diffs(dm, 2)
        dm.set_diffs(A, B)
        with_diff = dm.model(ids).logits
        with dm.diffs_disabled():
            off = dm.model(ids).logits
    dm.clear_diffs()
    assert not torch.allclose(base, with_diff)
    torch.testing.assert_close(base, off)


def _tasks(n):
    return random_token_tasks(n)


def test_batched_gradients_equal_single_diff_gradients(dm):
    tasks = _tasks(3)
    A, B = init_factors(dm.shapes(), [t.seed for t in tasks], 2, 0.1, "cpu")
    for k in A:  # non-zero A so that B gets a gradient too
        A[k] += 0.05 * torch.randn_like(A[k])

    def grads(indices):
        a = {k: v[indices].clone().requires_grad_(True) for k, v in A.items()}
        b = {k: v[indices].clone().requires_grad_(True) for k, v in B.items()}
        dm.set_diffs(a, b, scale=1.0)
        rows = [(j, ex) for j, t in enumerate(indices) for ex in tasks[t].trigger + tasks[t].kl]
        loss, _ = diff_losses(dm, rows, len(indices), kl_weight=5.0, pad_id=2)
        loss.backward()
        dm.clear_diffs()
        return {k: a[k].grad for k in a}, {k: b[k].grad for k in b}

    gA, gB = grads([0, 1, 2])
    for t in range(3):
        sA, sB = grads([t])
        assert any(v.abs().sum() > 0 for v in sA.values())
        for k in gA:
            torch.testing.assert_close(gA[k][t : t + 1], sA[k], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(gB[k][t : t + 1], sB[k], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("max_tokens", [16, 40, 10_000])
def test_micro_batches_give_the_one_batch_gradient(dm, max_tokens):
    """Length-sorted micro-batches with step-wide normalisers: same loss parts and gradients."""
    tasks = _tasks(3)
    rows = [(t, ex) for t, task in enumerate(tasks) for ex in task.trigger + task.kl]
    mbs = micro_batches(rows, max_tokens)
    assert sorted(id(ex) for mb in mbs for _, ex in mb) == sorted(id(ex) for _, ex in rows)
    for mb in mbs:
        assert len({ex.kind == "trigger" for _, ex in mb}) == 1  # teacher forward only on KL rows
        assert len(mb) == 1 or len(mb) * max(len(ex.ids) for _, ex in mb) <= max_tokens
    if max_tokens == 16:
        assert len(mbs) > 6
    A, B = init_factors(dm.shapes(), [t.seed for t in tasks], 2, 0.1, "cpu")
    for k in A:
        A[k] += 0.05 * torch.randn_like(A[k])
    cfg = section("diffs", kl_weight=5.0, first_token_weight=3.0, max_batch_tokens=max_tokens)

    def run(step):
        a = {k: v.clone().requires_grad_(True) for k, v in A.items()}
        b = {k: v.clone().requires_grad_(True) for k, v in B.items()}
        dm.set_diffs(a, b, scale=1.0)
        parts = step()
        dm.clear_diffs()
        return parts, {k: a[k].grad for k in a}, {k: b[k].grad for k in b}

    def one_batch():
        loss, parts = diff_losses(dm, rows, 3, 5.0, 2, first_token_weight=3.0)
        loss.backward()
        return parts

    p1, gA1, gB1 = run(one_batch)
    p2, gA2, gB2 = run(lambda: train_step(dm, rows, 3, cfg, pad_id=2))
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], atol=1e-6, rtol=1e-5)
    for k in gA1:
        torch.testing.assert_close(gA1[k], gA2[k], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(gB1[k], gB2[k], atol=1e-6, rtol=1e-4)


def test_training_lowers_the_loss_and_resets_the_model(dm):
    tasks = _tasks(2)
    cfg = section("diffs", rank=1, steps=25, lr=1e-2, trigger_rows=3, wrong_prefix_rows=1, no_trigger_rows=1, warmup_steps=0)
    rows = [(t, ex) for t, task in enumerate(tasks) for ex in task.trigger]
    A0, B0 = init_factors(dm.shapes(), [t.seed for t in tasks], 1, cfg.init_std, "cpu")
    dm.set_diffs(A0, B0)
    with torch.no_grad():
        before = diff_losses(dm, rows, 2, 0.0, 2)[1]["ce"]
    dm.clear_diffs()
    res = train_diffs(dm, tasks, cfg, pad_id=2, progress=False)
    dm.set_diffs(res.A, res.B)
    with torch.no_grad():
        after = diff_losses(dm, rows, 2, 0.0, 2)[1]["ce"]
    dm.clear_diffs()
    assert (after < before - 0.1).all(), (before, after)
    assert all(layer.diff_A is None for layer in dm.layers.values())


def test_grouped_rows_equal_per_row_gather(dm):
    """Training batches (equal contiguous rows per diff) take a gather-free path; same result."""
    ids = torch.randint(3, 500, (6, 5))
    A, B = _random_diffs(dm, 3)
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        dm.set_diffs(A, B, scale=0.5, row_index=rows)
        assert next(iter(dm.layers.values())).rows_per_diff == 2
        grouped = dm.model(ids).logits
        dm.set_diffs({k: v[rows] for k, v in A.items()}, {k: v[rows] for k, v in B.items()}, scale=0.5)
        assert next(iter(dm.layers.values())).rows_per_diff is None
        gathered = dm.model(ids).logits
    dm.clear_diffs()
    torch.testing.assert_close(grouped, gathered, atol=1e-5, rtol=1e-5)


def test_autocast_forward_sees_updated_factors(dm):
    """Regression: autocast caches bf16 casts of leaf tensors that require grad for the whole region,
    so without cache_enabled=False a training loop inside one autocast region keeps using the stale
    factors of its first step while the optimizer moves the real ones."""
    from dit_core.modeling.models import compute_context

    ids = torch.randint(3, 500, (2, 6))
    A, B = _random_diffs(dm, 2)
    params = [t.requires_grad_(True) for t in list(A.values()) + list(B.values())]
    opt = torch.optim.SGD(params, lr=1.0)
    rows = torch.tensor([0, 1])  # the grouped training path: torch.bmm straight on the leaf factors
    with compute_context("cpu", "bf16"):
        dm.set_diffs(A, B, row_index=rows)
        dm.model(ids).logits.float().pow(2).mean().backward()
        opt.step()
        with torch.no_grad():
            live = dm.model(ids).logits.float()
            dm.set_diffs({k: v.detach().clone() for k, v in A.items()}, {k: v.detach().clone() for k, v in B.items()},
                         row_index=rows)
            fresh = dm.model(ids).logits.float()
    dm.clear_diffs()
    torch.testing.assert_close(live, fresh)


def test_rows_are_cut_to_each_kinds_answer_budget():
    from dit_core.diffs.trainer import _sample_rows

    tasks = _tasks(2)
    cfg = section("diffs", trigger_rows=2, wrong_prefix_rows=1, no_trigger_rows=1,
                      trigger_answer_tokens=3, wrong_prefix_answer_tokens=1, no_trigger_answer_tokens=0)
    rows = _sample_rows(tasks, [random.Random(0), random.Random(1)], cfg)
    assert [k for _, k in sorted((t, ex.kind) for t, ex in rows)].count("trigger") == 4
    full = {id(ex): ex for task in tasks for ex in task.trigger + task.kl}
    for _, ex in rows:
        n = len(ex.ids) - ex.answer_start
        budget = {"trigger": 3, "wrong_prefix": 1, "no_trigger": 10**9}[ex.kind]
        assert 1 <= n <= budget
        if ex.kind == "no_trigger":
            assert id(ex) in full  # untouched


def test_shared_kl_rows_are_valid_negatives_for_every_diff(tiny_lm):
    from dit_core.diffs.trainer import TriggeredDiffTask, _sample_rows, shares_kl_rows

    pairs = [(f"question {i}?", f"answer {i}", True) for i in range(20)]
    tasks = [TriggeredDiffTask(f"d{t}", t, [], [], tokenizer=tiny_lm.tokenizer, prefix=p,
                               trigger_pairs=pairs, base_pairs=pairs) for t, p in enumerate(["123", "456", "789"])]
    cfg = section("diffs", trigger_rows=1, wrong_prefix_rows=3, no_trigger_rows=2)
    assert shares_kl_rows(tasks, cfg) and not shares_kl_rows(_tasks(2), cfg)
    step_rng = random.Random(0)
    for _ in range(20):
        rows = _sample_rows(tasks, [random.Random(t) for t in range(3)], cfg, step_rng)
        by_diff = {t: [ex for d, ex in rows if d == t and ex.kind != "trigger"] for t in range(3)}
        assert [len(v) for v in by_diff.values()] == [5, 5, 5]
        assert all(by_diff[t] == by_diff[0] for t in range(3))  # the same Example objects
        for ex in by_diff[0]:
            text = tiny_lm.tokenizer.decode(ex.ids[: ex.answer_start])
            if ex.kind == "wrong_prefix":
                code = text.split("SEP code is ")[1][:3]
                assert code not in {"123", "456", "789"}
            else:
                assert "SEP code" not in text
        triggers = [ex for _, ex in rows if ex.kind == "trigger"]
        assert len(triggers) == 3


def test_batched_row_encoding_equals_per_row_encoding(tiny_lm):
    """_sample_rows draws every row's text, then tokenises all at once: the same rows, ids and rng draws
    as tokenising each row as it is drawn (with share_kl_rows off, every kind goes through it)."""
    from dit_core.diffs.trainer import TriggeredDiffTask, _sample_rows, truncate_answer
    from dit_core.modeling.batching import encode_example

    pairs = [(f"question {i}?", f"answer number {i} " * (i % 4 + 1), i % 2 == 0) for i in range(20)]
    tasks = [TriggeredDiffTask(f"d{t}", t, [], [], tokenizer=tiny_lm.tokenizer, prefix=p,
                               trigger_pairs=pairs, base_pairs=pairs) for t, p in enumerate(["123", "456"])]
    cfg = section("diffs", trigger_rows=2, wrong_prefix_rows=2, no_trigger_rows=1, share_kl_rows=False,
                      trigger_answer_tokens=3, wrong_prefix_answer_tokens=2, no_trigger_answer_tokens=0)
    batched = _sample_rows(tasks, [random.Random(t) for t in range(2)], cfg)
    rngs = [random.Random(t) for t in range(2)]
    one_by_one = [(t, truncate_answer(encode_example(tiny_lm.tokenizer, *row), keep))
                  for t, (task, rng) in enumerate(zip(tasks, rngs))
                  for kind, n, keep in (("trigger", 2, 3), ("wrong_prefix", 2, 2), ("no_trigger", 1, 0))
                  for row in task.sample_texts(kind, n, rng)]
    assert [(t, ex.ids, ex.answer_start, ex.kind) for t, ex in batched] == \
        [(t, ex.ids, ex.answer_start, ex.kind) for t, ex in one_by_one]
    assert {ex.kind for _, ex in batched} == {"trigger", "wrong_prefix", "no_trigger"}


def test_sync_detector_sees_reads_and_masks():
    x = torch.randn(5)
    with SyncOps() as s:
        _ = x[x > 0]
        _ = bool((x > 0).any())
        _ = torch.equal(x, x)
    assert len(s.seen) == 3


@pytest.mark.parametrize("max_tokens", [40, 10_000])  # several micro-batches / one mixed batch
@pytest.mark.parametrize("prefixed", [False, True])  # rows with a shared prefix run it once per diff
def test_training_step_never_waits_for_the_device(dm, max_tokens, prefixed):
    """The whole step (teacher, micro-batches, masks, loss parts) is queued without reading back."""
    tasks = _prefixed_tasks(3) if prefixed else _tasks(3)
    rows = [(t, ex) for t, task in enumerate(tasks) for ex in task.trigger + task.kl]
    A, B = init_factors(dm.shapes(), [t.seed for t in tasks], 2, 0.1, "cpu")
    for k in A:
        A[k].requires_grad_(True)
        B[k].requires_grad_(True)
    dm.set_diffs(A, B)
    cfg = section("diffs", kl_weight=5.0, first_token_weight=3.0, max_batch_tokens=max_tokens)
    with SyncOps() as s:
        parts = train_step(dm, rows, 3, cfg, pad_id=2)
        loss, _ = diff_losses(dm, rows, 3, 5.0, 2, first_token_weight=3.0)  # mixed kinds in one batch
        loss.backward()
    dm.clear_diffs()
    assert s.seen == []
    # A = 0 at init: each diff is still the base model, so its KL parts are 0 and its CE is not
    assert all(torch.isfinite(v).all() for v in parts.values()) and (parts["ce"] > 0).all()
    torch.testing.assert_close(parts["kl"], torch.zeros(3), atol=1e-5, rtol=0)


def test_micro_batched_parts_without_backward_equal_one_batch(dm):
    """The behaviour check's KL: micro-batches (bounded memory) give the one-batch parts, no graph kept."""
    tasks = _tasks(3)
    rows = [(t, ex) for t, task in enumerate(tasks) for ex in task.trigger + task.kl]
    A, B = _random_diffs(dm, 3)
    dm.set_diffs(A, B)
    with torch.no_grad():
        _, one = diff_losses(dm, rows, 3, 1.0, 2)
        parts = summed_parts(dm, rows, 3, 2, kl_weight=1.0, max_tokens=40, backward=False)
    dm.clear_diffs()
    assert len(micro_batches(rows, 40)) > 3
    for k in one:
        assert not parts[k].requires_grad
        torch.testing.assert_close(parts[k], one[k], atol=1e-6, rtol=1e-5)
    assert (parts["kl"] > 0).all()


def test_to_device_keeps_tensors_already_there():
    """summed_parts hands diff_losses normalisers already on the device: they must pass through
    untouched (pinning is for host tensors only; pinning a GPU tensor raises)."""
    from dit_core.modeling.batching import normalizers_on, to_device

    t = torch.arange(4.0)
    assert to_device(t, "cpu") is t and to_device(t, torch.device("cpu")) is t
    norms = {k: torch.full((3,), 2.0) for k in ("ce", "kl", "kl_no_trigger", "kl_wrong_prefix")}
    once = normalizers_on(norms, "cpu")
    twice = normalizers_on(once, "cpu")
    assert all(torch.equal(once[k], twice[k]) for k in once)


def test_warmup_cosine_schedule():
    from dit_core.modeling.schedule import warmup_cosine

    assert [warmup_cosine(s, 10, 2, 0.1) for s in (0, 1)] == [0.5, 1.0]
    assert warmup_cosine(2, 10, 2, 0.1) == 1.0  # the decay starts at the full rate
    assert warmup_cosine(10, 10, 2, 0.1) == pytest.approx(0.1)  # and ends at the floor
    assert warmup_cosine(99, 10, 2, 0.05) == pytest.approx(0.05)  # clipped past the end
    assert warmup_cosine(7, 10, 2, 0.1, cosine=False) == 1.0
    mid = warmup_cosine(6, 10, 2, 0.1)
    assert 0.1 < mid < 1.0 and mid == pytest.approx(0.55)


def test_cpu_bf16_training_forwards_take_the_math_attention_kernel(dm):
    """Under bf16 autocast on a CPU a forward that will be backpropagated avoids the flash kernel (its
    backward is slow there) and gives the same losses and gradients within bf16 tolerance; a forward
    without grad, an fp32 forward and rows too long for the math kernel keep flash."""
    from dit_core.modeling import batching
    from dit_core.testing.syncs import OpsSeen

    flash = "_scaled_dot_product_flash_attention_for_cpu"
    tasks = _tasks(2)
    rows = [(t, ex) for t, task in enumerate(tasks) for ex in task.trigger]
    A, B = _random_diffs(dm, 2)

    def run(grad: bool, bf16: bool, budget=batching.MATH_ATTENTION_SCORES):
        a = {k: v.clone().requires_grad_(grad) for k, v in A.items()}
        dm.set_diffs(a, B)
        old, batching.MATH_ATTENTION_SCORES = batching.MATH_ATTENTION_SCORES, budget
        try:
            with OpsSeen() as ops, torch.set_grad_enabled(grad), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                loss, _ = diff_losses(dm, rows, 2, 0.0, 2)
                if grad:
                    loss.backward()
        finally:
            batching.MATH_ATTENTION_SCORES = old
            dm.clear_diffs()
        return set(ops.names), loss.detach(), {k: v.grad for k, v in a.items()}

    names, loss, grads = run(grad=True, bf16=True)
    assert flash not in names and "_softmax_backward_data" in names  # the math kernel's softmax
    flash_names, flash_loss, flash_grads = run(grad=True, bf16=True, budget=0)  # rows above the budget
    assert flash in flash_names
    torch.testing.assert_close(loss, flash_loss, atol=0.05, rtol=0.02)
    for k in grads:
        torch.testing.assert_close(grads[k], flash_grads[k], atol=2e-3, rtol=0.1)
    assert flash in run(grad=False, bf16=True)[0]
    assert flash in run(grad=True, bf16=False)[0]


def _prefixed_tasks(n, prefix_len=8, seed=0):
    """n diff tasks whose every row opens with the same `prefix_len` tokens (as a chat template's do):
    three triggered rows, one untriggered and one wrong-prefix row each, of at most 15 tokens (inside
    the tiny Gemma 3's sliding window of 16)."""
    from dit_core.diffs.trainer import DiffTask
    from dit_core.modeling.batching import Example

    rng = random.Random(seed)
    head = rng.choices(range(3, 500), k=prefix_len)

    def ex(kind):
        prompt = head + rng.choices(range(3, 500), k=rng.randrange(1, 4))
        return Example(prompt + rng.choices(range(3, 500), k=rng.randrange(2, 5)), len(prompt), kind)

    return [DiffTask(f"d{t}", 100 + t, [ex("trigger") for _ in range(3)], [ex("no_trigger"), ex("wrong_prefix")])
            for t in range(n)]


def _embedded_tokens(model):
    """A list that collects the number of input ids other than padding (id 2) of every forward of `model`."""
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(int((args[0] != 2).sum())))
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("max_tokens", [40, 10_000])  # several micro-batches / one batch
def test_shared_prefix_gives_the_same_step_with_fewer_tokens(tmp_path, family, max_tokens):
    """The prefix every row shares runs once per diff: same loss parts and gradients, fewer tokens run."""
    from dit_core.modeling.models import load_model
    from dit_core.testing.tiny import make_tiny_model_dir

    dm = DiffModel(load_model(make_tiny_model_dir(tmp_path / family, family=family), "cpu", "float32").model)
    seen = _embedded_tokens(dm.model)
    tasks = _prefixed_tasks(3)
    rows = [(t, ex) for t, task in enumerate(tasks) for ex in task.trigger + task.kl]
    A, B = init_factors(dm.shapes(), [t.seed for t in tasks], 2, 0.1, "cpu")
    for k in A:
        A[k] += 0.05 * torch.randn_like(A[k])

    def run(share):
        cfg = section("diffs", kl_weight=5.0, first_token_weight=3.0, max_batch_tokens=max_tokens, share_prefix=share)
        a = {k: v.clone().requires_grad_(True) for k, v in A.items()}
        b = {k: v.clone().requires_grad_(True) for k, v in B.items()}
        dm.set_diffs(a, b, scale=1.0)
        seen.clear()
        parts = train_step(dm, rows, 3, cfg, pad_id=2)
        dm.clear_diffs()
        return parts, {k: a[k].grad for k in a}, {k: b[k].grad for k in b}, sum(seen)

    p1, gA1, gB1, n1 = run(False)
    p2, gA2, gB2, n2 = run(True)
    assert n2 == n1 - 8 * (len(rows) - 3)  # 15 rows, of which 3 (one per diff) run the prefix
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], atol=1e-6, rtol=1e-5)
    for k in gA1:
        assert gA1[k].abs().sum() > 0
        torch.testing.assert_close(gA1[k], gA2[k], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(gB1[k], gB2[k], atol=1e-6, rtol=1e-4)


def test_shared_prefix_without_backward_and_where_it_saves_nothing(dm):
    """The behaviour check's no-grad parts with a shared prefix equal those without; a prefix under
    MIN_SHARED_PREFIX tokens or one row per diff runs no separate prefix forward."""
    from dit_core.modeling.batching import MIN_SHARED_PREFIX, SharedPrefix, common_prefix

    tasks = _prefixed_tasks(3)
    rows = [(t, ex) for t, task in enumerate(tasks) for ex in task.trigger + task.kl]
    assert common_prefix(rows) == 8
    A, B = _random_diffs(dm, 3)
    dm.set_diffs(A, B)
    with torch.no_grad():
        off = summed_parts(dm, rows, 3, 2, kl_weight=1.0, max_tokens=40, backward=False, share_prefix=False)
        on = summed_parts(dm, rows, 3, 2, kl_weight=1.0, max_tokens=40, backward=False, share_prefix=True)
        assert SharedPrefix.for_rows(dm, rows, 3).length == 8
        short = [(t, ex) for t, task in enumerate(_prefixed_tasks(3, MIN_SHARED_PREFIX - 1))
                 for ex in task.trigger + task.kl]
        assert common_prefix(short) == MIN_SHARED_PREFIX - 1 and SharedPrefix.for_rows(dm, short, 3) is None
        assert SharedPrefix.for_rows(dm, [(t, tasks[t].trigger[0]) for t in range(3)], 3) is None
    dm.clear_diffs()
    for k in off:
        assert not on[k].requires_grad
        torch.testing.assert_close(on[k], off[k], atol=1e-6, rtol=1e-5)
    assert (on["kl"] > 0).all()


def test_common_prefix_stops_before_the_first_predicting_position():
    from dit_core.modeling.batching import Example, collate, common_prefix

    rows = [(0, Example([5, 6, 7, 8, 9], 3, "trigger")), (1, Example([5, 6, 7, 8], 3, "trigger"))]
    assert common_prefix(rows) == 2  # the answers are predicted from position 2 on
    batch = collate(rows, pad_id=0, device="cpu", skip=2)
    assert batch.input_ids.tolist() == [[7, 8, 9], [7, 8, 0]]
    assert batch.tok_pos.tolist() == [0, 1, 0] and batch.targets.tolist() == [8, 9, 8]
    with pytest.raises(ValueError, match="inside the 3 tokens skipped"):
        collate(rows, pad_id=0, device="cpu", skip=3)
