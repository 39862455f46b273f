"""Device checks of the diff trainer and the diff bank against the CPU, in one short call (tiny model).

    python bench/gpu_checks.py --out reports/bench/gpu_checks.json   # on a GPU (well under a minute)
    python bench/gpu_checks.py --device cpu                  # the same code paths on a CPU (tests run this)

The CPU suite cannot see CUDA-only failures (pinned copies, device indexing, kernels), so run these on
a new GPU machine before any long job:
  equal  a training step's loss parts and factor gradients on the device equal the CPU's (fp32)
  syncs  host-device syncs in a training step: CUDA's sync debug mode on a GPU (blocking copies
         included), `dit_core.testing.syncs.SyncOps` on a CPU; 0 expected, each one's source line reported
  bank   `DiffBank.preload(device).get` returns exactly what streaming from disk returns
  bf16   a few steps of `train_diffs` in the pipeline's dtype and autocast: finite, loss falls
Writes a JSON report; exits 1 if `equal`, `bank` or `bf16` fails (a sync is reported, not fatal).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_core.config import DiffsConfig  # noqa: E402
from dit_core.diffs.bank import DiffBank  # noqa: E402
from dit_core.diffs.store import DiffShard, write_shard  # noqa: E402
from dit_core.diffs.trainer import init_factors, train_diffs, train_step  # noqa: E402
from dit_core.modeling.lora import DiffModel  # noqa: E402
from dit_core.modeling.models import compute_context, load_model  # noqa: E402
from dit_core.testing.syncs import SyncOps  # noqa: E402
from dit_core.testing.tiny import make_tiny_model_dir, random_token_tasks  # noqa: E402

PAD = 2


# The checks' own rows: two of each KL kind and whole answers, so every loss part has tokens to compare.
CHECK_ROWS = dict(trigger_rows=2, wrong_prefix_rows=2, no_trigger_rows=1, trigger_answer_tokens=0,
                  wrong_prefix_answer_tokens=0, no_trigger_answer_tokens=0, first_token_weight=1.0)


def _recipe(**values) -> DiffsConfig:
    """params.yaml's diffs recipe with the checks' rows and `values` replacing its keys."""
    from dit_core.config import load_params

    return DiffsConfig(**{**load_params(ROOT / "params.yaml").diffs.model_dump(), **CHECK_ROWS, **values})


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


def upload(A0, B0, device):
    """Fresh trainable copies of the factors on `device`."""
    return ({k: v.to(device).clone().requires_grad_(True) for k, v in A0.items()},
            {k: v.to(device).clone().requires_grad_(True) for k, v in B0.items()})


def one_step(dm: DiffModel, tasks, a, b, cfg: DiffsConfig, read_back: bool = True):
    """Loss parts and factor gradients of one training step with trainable factors a, b (returned on the
    CPU); with read_back=False nothing comes back to the host (that is the caller's sync, not the step's)."""
    dm.set_diffs(a, b, scale=1.0)
    rows = [(t, ex) for t, task in enumerate(tasks) for ex in task.trigger + task.kl]
    parts = train_step(dm, rows, len(tasks), cfg, PAD)
    dm.clear_diffs()
    if not read_back:
        return None
    return ({k: v.cpu() for k, v in parts.items()}, {k: v.grad.cpu() for k, v in a.items()},
            {k: v.grad.cpu() for k, v in b.items()})


def count_step_syncs(dm: DiffModel, tasks, A0, B0, cfg: DiffsConfig, device) -> tuple[int, list[str]]:
    """Syncs in one training step (after a warm-up step), with where they came from. The factors are
    uploaded before counting: in training they live on the device."""
    one_step(dm, tasks, *upload(A0, B0, device), cfg)  # warm-up: library handles, allocator
    a, b = upload(A0, B0, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                one_step(dm, tasks, a, b, cfg, read_back=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        hits = [f"{Path(w.filename).name}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]
        return len(hits), sorted(set(hits))
    with SyncOps() as s:
        one_step(dm, tasks, a, b, cfg, read_back=False)
    return len(s.seen), sorted(set(s.seen))


def check_bank(dm: DiffModel, device) -> bool:
    """Preloaded lookup on `device` equals streamed lookup, in a shuffled order with repeats."""
    shapes = dm.shapes()
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for s in range(2):
            ids = [f"s{s}d{i}" for i in range(3)]
            A = {m: torch.randn(3, 2, o, generator=g) for m, (i, o) in shapes.items()}
            B = {m: torch.randn(3, i, 2, generator=g) for m, (i, o) in shapes.items()}
            write_shard(Path(tmp) / f"shard-{s}.safetensors", DiffShard(A, B, "tiny", "0" * 64, 2, 0.5, ids))
            rows += [{"diff_id": d, "store": tmp, "shard": f"shard-{s}.safetensors", "row": r}
                     for r, d in enumerate(ids)]
        index = pl.DataFrame(rows)
        want = ["s1d2", "s0d0", "s1d0", "s0d0", "s0d2"]
        ref = DiffBank(index, shapes).get(want)
        bank = DiffBank(index, shapes)
        if not bank.preload(device):
            return False
        got = bank.get(want)
    same = all(torch.equal(got[i][m].cpu(), ref[i][m]) for i in (0, 1) for m in shapes)
    return same and torch.equal(got[2].cpu(), ref[2]) and got[0][dm.names[0]].device.type == device.type


def check_bf16(model_dir: Path, device, steps: int = 6) -> dict:
    """train_diffs in the pipeline's dtype/autocast for `device`: finite losses that fall."""
    lm = load_model(model_dir, str(device), "auto")
    dm = DiffModel(lm.model)
    tasks = random_token_tasks(4, seed=3)
    cfg = _recipe(rank=2, steps=steps, lr=0.05, warmup_steps=0, max_batch_tokens=64, share_kl_rows=False)
    with compute_context(lm.device, "auto"):
        first = train_diffs(dm, tasks, cfg.model_copy(update={"steps": 1}), PAD, progress=False).final
        last = train_diffs(dm, tasks, cfg, PAD, progress=False).final  # mean of its last 5 steps
    l0, l1 = sum(first["loss"]), sum(last["loss"])
    return {"dtype": str(next(lm.model.parameters()).dtype), "loss_first_step": round(l0, 4),
            "loss_last_steps": round(l1, 4), "ok": bool(torch.isfinite(torch.tensor([l0, l1])).all() and l1 < l0)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON report path (default: print only)")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative error allowed, device vs CPU (fp32)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model_dir = make_tiny_model_dir(Path(tempfile.gettempdir()) / "dit-gpu-checks-tiny")
    cpu_dm = DiffModel(load_model(model_dir, "cpu", "float32").model)
    dev_dm = DiffModel(load_model(model_dir, str(device), "float32").model)
    tasks = random_token_tasks(3)
    A0, B0 = init_factors(cpu_dm.shapes(), [t.seed for t in tasks], 2, 0.1, "cpu")
    g = torch.Generator().manual_seed(0)
    A0 = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in A0.items()}  # B gets a gradient too
    cfg = _recipe(kl_weight=5.0, first_token_weight=3.0, max_batch_tokens=40)

    ref = one_step(cpu_dm, tasks, *upload(A0, B0, "cpu"), cfg)
    got = one_step(dev_dm, tasks, *upload(A0, B0, device), cfg)
    errs = {"parts": max(rel_err(got[0][k], ref[0][k]) for k in ref[0] if ref[0][k].abs().sum() > 0),
            "grad_A": max(rel_err(got[1][k], ref[1][k]) for k in ref[1]),
            "grad_B": max(rel_err(got[2][k], ref[2][k]) for k in ref[2])}
    n_syncs, where = count_step_syncs(dev_dm, tasks, A0, B0, cfg, device)
    report = {
        "device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "equal": {"max_rel_err": {k: float(f"{v:.3g}") for k, v in errs.items()}, "tol": args.tol,
                  "ok": max(errs.values()) <= args.tol},
        "syncs": {"per_step": n_syncs, "where": where},
        "bank": {"ok": check_bank(dev_dm, device)},
        "bf16": check_bf16(model_dir, device),
    }
    report["ok"] = report["equal"]["ok"] and report["bank"]["ok"] and report["bf16"]["ok"]
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
