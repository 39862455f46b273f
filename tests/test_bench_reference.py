"""bench/reference.py trains the same thing as the project's code, and bench/bench_vs_reference.py reports
every figure. Tiny model, fp32, no autocast; nothing here is timed."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_vs_reference as bench  # noqa: E402
import reference  # noqa: E402
from bench_diff_generation import synthetic_tasks  # noqa: E402

from dit_core.config import load_params  # noqa: E402
from dit_core.diffs.trainer import DiffTask, init_factors, train_diffs, train_step  # noqa: E402
from dit_core.interpreter.adapter import build_interpreter  # noqa: E402
from dit_core.modeling.batching import Example  # noqa: E402
from dit_core.modeling.lora import DiffModel  # noqa: E402
from dit_core.modeling.models import load_model  # noqa: E402


@pytest.fixture()
def models(tiny_model_dir):
    """A fresh tiny model wrapped for the project, and a plain copy for the reference."""
    lm = load_model(tiny_model_dir, "cpu", "float32")
    plain = copy.deepcopy(lm.model)
    return lm, DiffModel(lm.model), plain


def recipe(**values):
    p = load_params(ROOT / "params.yaml")
    return p.diffs.model_copy(update=dict(warmup_steps=0, lr=0.05, **values))


def test_reference_diffs_train_the_same_thing(models):
    """Same rows, same init: the same loss at step 0, then the same losses and factors after 3 steps."""
    lm, dm, plain = models
    pad = lm.tokenizer.pad_token_id
    tasks = synthetic_tasks(lm.tokenizer, 3)
    for steps in (1, 3):
        cfg = recipe(steps=steps, diffs_per_batch=3)
        got = train_diffs(dm, tasks, cfg, pad, progress=False)
        ref = reference.reference_train_diffs(plain, tasks, cfg, pad)
        for k in ("loss", "ce", "kl", "kl_no_trigger", "kl_wrong_prefix"):
            assert got.final[k] == pytest.approx(ref.final[k], rel=1e-4, abs=1e-6), (steps, k)
    assert sum(got.final["kl"]) > 0  # the diffs moved away from the base model: the KL term is live
    for name in dm.names:
        torch.testing.assert_close(ref.A[name], got.A[name], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(ref.B[name], got.B[name], rtol=1e-3, atol=1e-5)
    # the reference leaves its model plain (peft's modules removed) and trains per diff rows of one diff
    assert not any("lora" in n for n, _ in plain.named_modules())
    rows = reference.planned_rows(tasks, recipe(steps=1))[0]
    assert len({id(ex) for t, ex in rows if ex.kind != "trigger"}) < sum(ex.kind != "trigger" for _, ex in rows)


def test_reference_interpreter_trains_the_same_thing(models):
    """Factored diffs (project) and per-sample merged weights (reference): the same loss at step 0
    and after an optimizer step."""
    lm, dm, plain = models
    p = load_params(ROOT / "params.yaml")
    cfg = p.interpreter.model_copy(update={"lr": 0.01, "warmup_steps": 0})
    pad = lm.tokenizer.pad_token_id
    batches = bench.interpreter_batches(lm.tokenizer, cfg.question, dm.shapes(), 2, 3, 2, "cpu")
    torch.manual_seed(0)
    interp = build_interpreter(dm, bench.interpreter_spec(p, lm), lm.tokenizer, cfg.init_std)
    init = {k: v.clone() for k, v in interp.state().items()}
    ref = reference.ReferenceInterpreter(plain, dm.names, init, cfg.alpha)
    lp = bench.project_interpreter_steps(dm, interp, torch.optim.AdamW(interp.parameters(), lr=cfg.lr,
                                                                       weight_decay=0.0), batches, cfg, pad)
    lr = bench.reference_interpreter_steps(ref, torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=0.0),
                                           batches, cfg, pad)
    assert [float(x) for x in lp] == pytest.approx([float(x) for x in lr], rel=1e-5)
    assert float(lp[0]) != pytest.approx(float(lp[1]), rel=1e-3)  # the step moved the interpreter
    for name, layer in ref.layers.items():
        torch.testing.assert_close(layer.lora_A.detach(), dm.layers[name].adapter_A.detach(), rtol=1e-3, atol=1e-4)
    ref.restore()
    assert not any(isinstance(m, reference.MergedDiffLinear) for m in plain.modules())


def equal_length_tasks(n: int, prompt: int, answer: int) -> list[DiffTask]:
    """Diff tasks whose rows all have the same length: no padding anywhere, in either path."""
    g = torch.Generator().manual_seed(0)

    def ex(kind):
        return Example(torch.randint(3, 500, (prompt + answer,), generator=g).tolist(), prompt, kind)

    return [DiffTask(f"d{t}", 10 + t, [ex("trigger") for _ in range(2)], [ex("no_trigger"), ex("wrong_prefix")])
            for t in range(n)]


def test_flops_equal_for_the_same_work(models):
    """Rows without padding: the two diff steps differ by exactly the reference's extra lm_head work
    (logits at every position, not only at answer positions). The interpreter steps differ by that and
    by merging each sample's B @ A, against the factored diff products of the project."""
    lm, dm, plain = models
    pad = lm.tokenizer.pad_token_id
    h, V = lm.model.config.hidden_size, lm.model.config.vocab_size
    prompt, answer, T = 6, 4, 2
    tasks = equal_length_tasks(T, prompt, answer)
    cfg = recipe(steps=1, rank=2, trigger_rows=2, wrong_prefix_rows=1, no_trigger_rows=1, trigger_answer_tokens=0,
                 wrong_prefix_answer_tokens=0, no_trigger_answer_tokens=0, max_batch_tokens=4096)
    rows = reference.planned_rows(tasks, cfg)

    def project_step():
        A, B = init_factors(dm.shapes(), [t.seed for t in tasks], cfg.rank, cfg.init_std, "cpu")
        for v in (*A.values(), *B.values()):
            v.requires_grad_(True)
        dm.set_diffs(A, B)
        train_step(dm, rows[0], T, cfg, pad)
        dm.clear_diffs()

    fp = bench.count_flops(project_step)
    fr = bench.count_flops(lambda: reference.reference_train_diffs(plain, tasks, cfg, pad, rows=rows))
    n_rows, n_kl = len(rows[0]), sum(ex.kind != "trigger" for _, ex in rows[0])
    s = prompt + answer
    # per position the lm_head costs 2hV forward and 2hV backward (input gradient; the weight is frozen)
    extra = 4 * h * V * (n_rows * s - n_rows * answer) + 2 * h * V * (n_kl * s - n_kl * answer)
    assert fp > 0 and fr - fp == extra

    p = load_params(ROOT / "params.yaml")
    icfg = p.interpreter
    b, r_diff = 3, 2
    batches = bench.interpreter_batches(lm.tokenizer, icfg.question, dm.shapes(), 1, b, r_diff, "cpu")
    torch.manual_seed(0)
    interp = build_interpreter(dm, bench.interpreter_spec(p, lm), lm.tokenizer, icfg.init_std)
    ref = reference.ReferenceInterpreter(plain, dm.names, interp.state(), icfg.alpha)
    opt = torch.optim.AdamW(interp.parameters())
    ip = bench.count_flops(lambda: bench.project_interpreter_steps(dm, interp, opt, batches, icfg, pad, False))
    ir = bench.count_flops(lambda: bench.reference_interpreter_steps(ref, opt, batches, icfg, pad, False))
    ex = batches[0][3]
    width, n_ans = max(len(e.ids) for e in ex), sum(len(e.ids) - e.answer_start for e in ex)
    merge = sum(2 * b * i * r_diff * o for i, o in dm.shapes().values())  # bmm(B, A) per layer
    # project: x @ B, then @ A: 2 * b * s * r * (in + out) forward per layer, as much again backward for
    # the input gradient, except in the first layer's q/k/v projections, whose input needs none
    first = ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj")
    factored = sum(2 * b * width * r_diff * (i + o) * (1 if name.endswith(first) else 2)
                   for name, (i, o) in dm.shapes().items())
    assert ip > 0 and ir - ip == merge - factored + 4 * h * V * (b * width - n_ans)


def test_bench_reports_every_field(tiny_model_dir, tmp_path):
    out = tmp_path / "vs.json"
    res = bench.main(["--model", str(tiny_model_dir), "--T", "2", "--steps", "1", "--interp-steps", "1",
                      "--interp-batch", "2", "--peak-n", "256", "--autocast", "off", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["matmul_peak_tflops"]["float32"] > 0 and res["hardware"]["torch"] == torch.__version__
    path_keys = {"seconds_per_step", "samples_per_second", "peak_memory_gb", "flops_per_step", "tflops_per_second",
                 "mfu"}
    for part, extra in (("diff_generation", {"diffs_per_minute_measured", "diffs_per_minute_at_recipe_steps"}),
                        ("interpreter_training", set())):
        for side in ("project", "reference"):
            r = res[part][side]
            assert path_keys | extra <= set(r), (part, side)
            assert r["seconds_per_step"] > 0 and r["flops_per_step"] > 0 and r["peak_memory_gb"] > 0
            assert r["mfu"] == pytest.approx(r["tflops_per_second"] / res["matmul_peak_tflops"]["float32"], rel=0.01)
        ratios = res[part]["ratios"]
        assert ratios["samples_per_second"] == pytest.approx(
            res[part]["project"]["samples_per_second"] / res[part]["reference"]["samples_per_second"], rel=0.01)
        assert ratios["flops_per_step"] < 1  # the reference does more work for the same step
    # both paths trained the same rows: the same mean loss (fp32)
    d = res["diff_generation"]
    assert d["project"]["final_loss_mean"] == pytest.approx(d["reference"]["final_loss_mean"], rel=1e-4)
    i = res["interpreter_training"]
    assert i["project"]["loss_first_step"] == pytest.approx(i["reference"]["loss_first_step"], rel=1e-4)


def test_bench_on_a_model_built_from_its_config(tiny_model_dir, tmp_path):
    """--shape builds the model from a published config with random weights (here the Qwen3 family's
    test-sized stand-in; qwen3-4b on a GPU): the same fields, the same loss on both paths."""
    from shapes import CONFIGS, build_config

    res = bench.main(["--model", str(tiny_model_dir), "--shape", "tiny-qwen3", "--T", "2", "--steps", "1",
                      "--interp-steps", "1", "--interp-batch", "2", "--peak-n", "256", "--autocast", "off",
                      "--out", str(tmp_path / "vs.json")])
    assert res["model"] == "tiny-qwen3"
    d = res["diff_generation"]
    assert d["project"]["final_loss_mean"] == pytest.approx(d["reference"]["final_loss_mean"], rel=1e-4)
    assert res["interpreter_training"]["project"]["flops_per_step"] > 0
    cfg = build_config("qwen3-4b")  # the published shape, without building it
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("qwen3", 2560, 36)
    assert CONFIGS["tiny-qwen3"][0] == "qwen3"
