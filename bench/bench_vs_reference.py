"""The project's diff generation and interpreter training against the reference approach
(`bench/reference.py`), on the same model, rows and lengths, in one process.

    python bench/bench_vs_reference.py                      # embedded model, CPU (about 3 minutes on 2 cores)
    python bench/bench_vs_reference.py --tiny               # seconds-long smoke run
    python bench/bench_vs_reference.py --device cuda --T 64 --interp-batch 16   # bf16 on a GPU
    python bench/bench_vs_reference.py --device cuda --shape qwen3-4b --T 16 --interp-batch 16   # Qwen3-4B-shaped

Diff generation: T diffs for --steps steps with the params.yaml recipe (--profile/--set laid over it),
first by `train_diffs` (all T diffs per step), then by the reference (one diff after another, deep-copied
teacher, fresh peft LoRA modules per diff, one padded batch per step) on exactly the rows `train_diffs`
drew. Interpreter training: --interp-steps steps of batch --interp-batch, each sample with its own
random diff, by the project's interpreter (factored diffs) and by the reference (each sample's diff
merged into per-sample weights).

Reported per path: seconds per step, diffs per minute (measured, and at the recipe's step count with
the fixed costs: teacher copy and LoRA wrapping), samples (rows) per second, peak memory (CUDA:
allocated; CPU: resident set), FLOPs per step (torch.utils.flop_counter on one step) and model FLOPs
utilisation against the matmul peak measured here (best of a few large GEMMs in the compute dtype;
on a CPU also fp32), and the ratios project / reference. JSON to --out.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_diff_generation import peak_rss_gb, reset_peak_rss, synthetic_tasks  # noqa: E402
from reference import ReferenceInterpreter, planned_rows, reference_train_diffs  # noqa: E402

from dit_core.config import load_params  # noqa: E402
from dit_core.diffs.trainer import init_factors, train_diffs, train_step  # noqa: E402
from dit_core.interpreter.adapter import InterpreterSpec, build_interpreter, label_example  # noqa: E402
from dit_core.modeling.lora import DiffModel, onednn_fp32_linears, onednn_linear, route_linears  # noqa: E402
from dit_core.modeling.models import (LoadedModel, autocast_decision, compute_context,  # noqa: E402
                                      fp32_linear_decision, load_model, resolve_device_dtype)
from dit_core.modeling.schedule import warmup_cosine  # noqa: E402

aten = torch.ops.aten
_T0 = time.perf_counter()


def note(msg: str) -> None:
    """A progress line on stderr, with the seconds since the start."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's FLOP counter knows the GPU attention kernels, not the CPU one: counted with the same formula.
CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


def count_flops(fn) -> int:
    """FLOPs of the matmuls and attention `fn()` runs (forward and backward), by torch's FLOP counter
    (on torch's kernels, which it knows: oneDNN's fp32 linears do the same products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter, onednn_fp32_linears(False):
        fn()
    return int(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5, onednn: bool = False) -> float:
    """Best TFLOP/s of an n x n x n GEMM in `dtype` on `device` over `repeats` runs (after a warm-up);
    `onednn`: by oneDNN's linear (the kernels fp32 linears run on under model.fp32_linear=onednn)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    product = (lambda: onednn_linear(a, b)) if onednn else (lambda: a @ b)
    product()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        product()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


class Memory:
    """Peak memory a block adds over what is resident when it starts, plus `base_bytes` (the model's
    weights, which every path needs once). CUDA: allocated memory; CPU: the resident set (freed heap
    memory returned to the system first, so an earlier block's free pages do not hide this one's)."""

    def __init__(self, device: torch.device, base_bytes: int):
        self.device, self.base_bytes = device, base_bytes

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass  # not glibc: freed pages may stay resident, the peak is then a lower bound
            reset_peak_rss()
            self.start = _rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = peak_rss_gb() * 1e9
        self.gb = round((max(peak - self.start, 0) + self.base_bytes) / 1e9, 3)


def _rss_bytes() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1e3
    except OSError:
        pass
    return 0.0


def random_diffs(shapes: dict[str, tuple[int, int]], n: int, rank: int, std: float = 0.05, seed: int = 0):
    """n random diffs (A: (n, r, out), B: (n, in, r)) with the model's module shapes, and their scales."""
    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(n, rank, o, generator=g) * std for m, (i, o) in shapes.items()}
    B = {m: torch.randn(n, i, rank, generator=g) * std for m, (i, o) in shapes.items()}
    return A, B, torch.ones(n)


def interpreter_batches(tokenizer, question: str, shapes, n_steps: int, batch: int, rank: int, device, seed: int = 0):
    """`n_steps` batches of `batch` samples: (A, B, scale, examples) on `device`, each sample its own
    random diff and a topic label."""
    from dit_core.data.topics import load_topics

    topics = load_topics()["topic"].to_list()
    A, B, scale = random_diffs(shapes, n_steps * batch, rank, seed=seed)
    out = []
    for s in range(n_steps):
        sl = slice(s * batch, (s + 1) * batch)
        ex = [label_example(tokenizer, question, topics[(s * batch + i) % len(topics)]) for i in range(batch)]
        out.append(({k: v[sl].to(device) for k, v in A.items()}, {k: v[sl].to(device) for k, v in B.items()},
                    scale[sl].to(device), ex))
    return out


def interpreter_lr(cfg, step: int, total: int) -> float:
    """The interpreter trainer's schedule (`InterpreterRecipe._lr`)."""
    return cfg.lr * warmup_cosine(step, total, cfg.warmup_steps, floor=0.05, cosine=cfg.schedule == "cosine")


def _interpreter_steps(loss_fn, opt, batches, cfg, step_opt: bool, after=None) -> list[torch.Tensor]:
    """The interpreter trainer's step (`InterpreterRecipe.train`, one micro-batch per step) on each batch,
    with `loss_fn(A, B, scale, ex)` the path's loss; `after()` runs after each step."""
    losses = []
    for step, (A, B, scale, ex) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = interpreter_lr(cfg, step, len(batches))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(A, B, scale, ex)
        loss.backward()
        if step_opt:
            opt.step()
        if after is not None:
            after()
        losses.append(loss.detach())
    return losses


def project_interpreter_steps(dm: DiffModel, interp, opt, batches, cfg, pad_id: int, step_opt: bool = True
                              ) -> list[torch.Tensor]:
    """The project's interpreter steps (diffs applied per row, cleared after each step)."""
    return _interpreter_steps(lambda A, B, scale, ex: interp.loss_with_grad(A, B, scale, ex, pad_id), opt, batches,
                              cfg, step_opt, after=dm.clear_diffs)


def reference_interpreter_steps(ref: ReferenceInterpreter, opt, batches, cfg, pad_id: int, step_opt: bool = True
                                ) -> list[torch.Tensor]:
    """The reference's interpreter steps (each sample's diff merged into its weights)."""
    return _interpreter_steps(lambda A, B, scale, ex: ref.loss(A, B, scale, ex, pad_id), opt, batches, cfg, step_opt)


def detach_adapter(dm: DiffModel) -> None:
    for layer in dm.layers.values():
        layer.adapter_A = layer.adapter_B = None


def interpreter_spec(p, lm) -> InterpreterSpec:
    c = p.interpreter
    return InterpreterSpec(kind="lora", question=c.question, rank=c.rank, alpha=c.alpha, modules=p.diffs.modules,
                           base_model=lm.name, base_sha256=lm.sha256)


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (FLOP rates span from a tiny model on a CPU to a GPU)."""
    return float(f"{x:.{digits}g}")


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def bench_diffs(lm, dm: DiffModel, ref_model, recipe, args, peak: float, base_bytes: int) -> dict:
    device, pad = lm.device, lm.tokenizer.pad_token_id
    tasks = synthetic_tasks(lm.tokenizer, args.T)
    cfg = recipe.model_copy(update=dict(steps=args.steps, diffs_per_batch=args.T, warmup_steps=0))
    rows = planned_rows(tasks, cfg)
    rows_per_step = len(rows[0])
    # warm-up of both paths (allocator, kernels), outside the timed region
    note(f"diff generation: warm-up, then {args.steps} steps of T={args.T} diffs, each path")
    train_diffs(dm, tasks, cfg.model_copy(update={"steps": 1}), pad, progress=False)
    reference_train_diffs(ref_model, tasks[:1], cfg.model_copy(update={"steps": 1}), pad,
                          rows=[[r for r in rows[0] if r[0] == 0]])
    best_p = best_r = None
    for rep in range(args.repeats):  # alternating, the best of each: a shared machine's load comes and goes
        with Memory(device, base_bytes) as mem:
            t0 = time.perf_counter()
            got = train_diffs(dm, tasks, cfg, pad, progress=False)
            sync(device)
            secs = time.perf_counter() - t0
        if best_p is None or secs < best_p[0]:
            best_p = (secs, got, mem if best_p is None else best_p[2])
        note(f"diff generation: reference ({rep + 1}/{args.repeats})")
        with Memory(device, base_bytes) as mem:
            t0 = time.perf_counter()
            ref = reference_train_diffs(ref_model, tasks, cfg, pad, rows=rows)
            sync(device)
            secs = time.perf_counter() - t0
        if best_r is None or secs - ref.seconds_copy - ref.seconds_wrap < best_r[0] - best_r[1].seconds_copy - best_r[1].seconds_wrap:
            best_r = (secs, ref, mem if best_r is None else best_r[2])
    (secs_p, got, mem_p), (secs_r, ref, mem_r) = best_p, best_r

    def project_step():
        A, B = init_factors(dm.shapes(), [t.seed for t in tasks], cfg.rank, cfg.init_std, device)
        for v in (*A.values(), *B.values()):
            v.requires_grad_(True)
        dm.set_diffs(A, B, scale=cfg.scale)
        train_step(dm, rows[0], len(tasks), cfg, pad)
        dm.clear_diffs()

    note("diff generation: FLOPs of one step, each path")
    flops_p = count_flops(project_step)
    one = cfg.model_copy(update={"steps": 1})
    flops_r = count_flops(lambda: reference_train_diffs(ref_model, tasks, one, pad, rows=rows[:1]))
    step_p = secs_p / args.steps  # one step trains all T diffs
    fixed_r = ref.seconds_copy + ref.seconds_wrap  # teacher copy once, LoRA wrapping per diff
    diff_step_r = (secs_r - fixed_r) / (args.T * args.steps)
    step_r = diff_step_r * args.T  # the same work as one project step
    S = args.recipe_steps or recipe.steps

    def path(secs, step, flops, mem, dpm_recipe, loss):
        return {"seconds": round(secs, 3), "seconds_per_step": round(step, 4),
                "seconds_per_diff_step": round(step / args.T, 4),
                "diffs_per_minute_measured": round(60 * args.T / secs, 3),
                "diffs_per_minute_at_recipe_steps": round(dpm_recipe, 3),
                "samples_per_second": round(rows_per_step / step, 2), "peak_memory_gb": mem.gb,
                "flops_per_step": flops, "tflops_per_second": sig(flops / step / 1e12),
                "mfu": sig(flops / step / 1e12 / peak), "final_loss_mean": round(sum(loss) / len(loss), 5)}

    proj = path(secs_p, step_p, flops_p, mem_p, 60 * args.T / (S * step_p), got.final["loss"])
    refd = path(secs_r, step_r, flops_r, mem_r, 60 * args.T / (fixed_r + S * step_r), ref.final["loss"])
    refd.update(seconds_teacher_copy=round(ref.seconds_copy, 3), seconds_lora_wrapping=round(ref.seconds_wrap, 3))
    return {"T": args.T, "steps": args.steps, "repeats": args.repeats, "recipe_steps": S, "rows_per_step": rows_per_step,
            "project": proj, "reference": refd, "ratios": ratios(proj, refd)}


def ratios(proj: dict, ref: dict) -> dict:
    """project / reference for each throughput, memory and FLOP figure both paths report."""
    keys = ["diffs_per_minute_measured", "diffs_per_minute_at_recipe_steps", "samples_per_second",
            "seconds_per_step", "peak_memory_gb", "flops_per_step", "mfu"]
    return {k: _ratio(proj[k], ref[k]) for k in keys if k in proj and k in ref}


def bench_interpreter(lm, dm: DiffModel, ref_model, p, args, peak: float, base_bytes: int) -> dict:
    device, pad, cfg = lm.device, lm.tokenizer.pad_token_id, p.interpreter
    batches = interpreter_batches(lm.tokenizer, cfg.question, dm.shapes(), args.interp_steps, args.interp_batch,
                                  p.diffs.rank, device)
    torch.manual_seed(cfg.seed)
    interp = build_interpreter(dm, interpreter_spec(p, lm), lm.tokenizer, cfg.init_std)
    init = {k: v.clone() for k, v in interp.state().items()}
    opt_p = torch.optim.AdamW(interp.parameters(), lr=cfg.lr, weight_decay=0.0)
    ref = ReferenceInterpreter(ref_model, dm.names, init, cfg.alpha)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=0.0)
    try:
        note(f"interpreter: warm-up, then {args.interp_steps} steps of batch {args.interp_batch}, each path")
        project_interpreter_steps(dm, interp, opt_p, batches[:1], cfg, pad, step_opt=False)  # warm-up
        reference_interpreter_steps(ref, opt_r, batches[:1], cfg, pad, step_opt=False)
        best_p = best_r = None
        for rep in range(args.repeats):  # alternating, the best of each (memory: the first run's)
            with Memory(device, base_bytes) as mem:
                t0 = time.perf_counter()
                losses = project_interpreter_steps(dm, interp, opt_p, batches, cfg, pad)
                sync(device)
                secs = time.perf_counter() - t0
            best_p = (secs, losses, mem) if best_p is None else (min(secs, best_p[0]), *best_p[1:])
            note(f"interpreter: reference ({rep + 1}/{args.repeats})")
            with Memory(device, base_bytes) as mem:
                t0 = time.perf_counter()
                losses = reference_interpreter_steps(ref, opt_r, batches, cfg, pad)
                sync(device)
                secs = time.perf_counter() - t0
            best_r = (secs, losses, mem) if best_r is None else (min(secs, best_r[0]), *best_r[1:])
        (secs_p, loss_p, mem_p), (secs_r, loss_r, mem_r) = best_p, best_r
        note("interpreter: FLOPs of one step, each path")
        flops_p = count_flops(lambda: project_interpreter_steps(dm, interp, opt_p, batches[:1], cfg, pad, False))
        flops_r = count_flops(lambda: reference_interpreter_steps(ref, opt_r, batches[:1], cfg, pad, False))
    finally:
        detach_adapter(dm)
        ref.restore()

    def path(secs, flops, mem, losses):
        step = secs / args.interp_steps
        return {"seconds": round(secs, 3), "seconds_per_step": round(step, 4),
                "samples_per_second": round(args.interp_batch / step, 3), "peak_memory_gb": mem.gb,
                "flops_per_step": flops, "tflops_per_second": sig(flops / step / 1e12),
                "mfu": sig(flops / step / 1e12 / peak), "loss_first_step": round(float(losses[0]), 5)}

    proj, refd = path(secs_p, flops_p, mem_p, loss_p), path(secs_r, flops_r, mem_r, loss_r)
    return {"batch": args.interp_batch, "steps": args.interp_steps, "repeats": args.repeats, "rank": cfg.rank, "diff_rank": p.diffs.rank,
            "project": proj, "reference": refd, "ratios": ratios(proj, refd)}


def hardware(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), None)
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor() or None
    info["cpu_threads"] = torch.get_num_threads()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def shaped_model(shape: str, tokenizer_dir: str, device: str, dtype: str) -> LoadedModel:
    """A `shape`-shaped model with random weights (nothing downloaded), with the tokenizer in `tokenizer_dir`."""
    from transformers import AutoTokenizer

    from shapes import build_model

    dev, dt = resolve_device_dtype(device, dtype)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = build_model(shape, dev, dt, vocab_size=len(tok))
    return LoadedModel(model=model, tokenizer=tok, name=shape, sha256="random weights", path=Path(tokenizer_dir))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "data/models/smollm2-135m-instruct"))
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (smoke run)")
    ap.add_argument("--shape", default=None,
                    help="a model of this shape with random weights (bench/shapes.py, e.g. qwen3-4b) built on the "
                    "device; --model then gives only the tokenizer")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="model weights: auto (bf16 on CUDA, fp32 on a CPU)")
    ap.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"])
    ap.add_argument("--fp32-linear", default="auto", choices=["auto", "torch", "onednn"],
                    help="kernels of fp32 linears on a CPU, as model.fp32_linear (both paths: the reference's copy "
                    "of the model has the same linears)")
    ap.add_argument("--T", type=int, default=4, help="diffs trained (one project step trains all of them)")
    ap.add_argument("--steps", type=int, default=3, help="timed diff-training steps")
    ap.add_argument("--recipe-steps", type=int, default=None,
                    help="steps per diff for diffs_per_minute_at_recipe_steps (default: the recipe's diffs.steps)")
    ap.add_argument("--interp-batch", type=int, default=None, help="interpreter batch (default: interpreter.batch_size)")
    ap.add_argument("--interp-steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed runs of each path, alternating; the best time of each is reported")
    ap.add_argument("--only", choices=["diffs", "interpreter"], default=None)
    ap.add_argument("--peak-n", type=int, default=None, help="GEMM size for the matmul peak (default 2048 CPU, 8192 GPU)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", dest="profiles", action="append", default=[])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "reports/bench/vs_reference.json"))
    args = ap.parse_args(argv)
    if args.tiny:
        from dit_core.testing.tiny import make_tiny_model_dir

        args.model = str(make_tiny_model_dir("/tmp/dit-bench-tiny"))
    p = load_params(args.params, args.overrides, args.profiles)
    args.interp_batch = args.interp_batch or p.interpreter.batch_size
    lm = shaped_model(args.shape, args.model, args.device, args.dtype) if args.shape else \
        load_model(args.model, args.device, args.dtype)
    device = lm.device
    use_bf16, why = autocast_decision(device, args.autocast)
    weight_dtype = next(lm.model.parameters()).dtype
    compute_dtype = torch.bfloat16 if use_bf16 or weight_dtype == torch.bfloat16 else weight_dtype
    n = args.peak_n or (8192 if device.type == "cuda" else 2048)
    note(f"matmul peak: {n} x {n} GEMMs")
    onednn, fp32_linear_why = fp32_linear_decision(device, args.fp32_linear, args.autocast)
    peaks = {str(compute_dtype).replace("torch.", ""): round(matmul_peak(device, compute_dtype, n, onednn=onednn), 4)}
    if device.type == "cpu" and compute_dtype != torch.float32:
        peaks["float32"] = round(matmul_peak(device, torch.float32, n), 4)
    peak = peaks[str(compute_dtype).replace("torch.", "")]
    base_bytes = sum(t.numel() * t.element_size() for t in lm.model.state_dict().values())
    route_linears(lm.model)  # as load_model does on a CPU, before the copy: both paths run the same kernels
    ref_model = copy.deepcopy(lm.model)  # the reference's own copy of the base model, never wrapped
    dm = DiffModel(lm.model, p.diffs.modules)
    report = {"date": date.today().isoformat(), "model": args.shape or args.model, "device": str(device),
              "weights_dtype": str(weight_dtype), "compute_dtype": str(compute_dtype), "autocast": why,
              "hardware": hardware(device), "matmul_peak_tflops": peaks, "peak_gemm_n": n,
              "params": args.params, "profiles": args.profiles, "overrides": args.overrides,
              "command": "python bench/bench_vs_reference.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    report["fp32_linear"] = fp32_linear_why
    with compute_context(device, args.autocast, args.fp32_linear):
        if args.only in (None, "diffs"):
            report["diff_generation"] = bench_diffs(lm, dm, ref_model, p.diffs, args, peak, base_bytes)
            print(json.dumps({"diff_generation": report["diff_generation"]}, indent=1), flush=True)
        if args.only in (None, "interpreter"):
            report["interpreter_training"] = bench_interpreter(lm, dm, ref_model, p, args, peak, base_bytes)
            print(json.dumps({"interpreter_training": report["interpreter_training"]}, indent=1), flush=True)
    if device.type == "cpu" and "float32" in peaks:
        for part in ("diff_generation", "interpreter_training"):
            for side in ("project", "reference"):
                if part in report:
                    r = report[part][side]
                    r["mfu_vs_fp32_peak"] = sig(r["tflops_per_second"] / peaks["float32"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()
