"""The per-row diff product of the adapted layers, forward and backward, by method.

    python bench/bench_lora_delta.py                          # SmolLM2-135M's layer shapes, CPU
    python bench/bench_lora_delta.py --shapes tiny --repeats 1   # seconds-long smoke run
    python bench/bench_lora_delta.py --device cuda --T 64 256 --rows 5 --seq 96 --compile

A training micro-batch holds rows of many diffs; each row b adds ((x_b @ B[d_b]) @ A[d_b]) * scale to
the frozen layer's output, d_b the row's diff. This times that layer (base matmul plus the per-row
product) over one copy of each distinct layer shape of the model (bench/shapes.py), weighted by how
often the shape occurs, forward and backward (gradients to x, A and B, as in training), for:

  base      the frozen layer alone (x W^T): the floor every method pays
  project   `DiffLinear` as the trainer runs it (rows in diff order: one bmm per diff; else a per-row
            gather of the factors and two batched products)
  loop      one matmul pair per diff over its rows' slice (rows in diff order), summed into the output
  concat    one GEMM of x with every diff's B side by side, each row's own columns kept, one GEMM with
            every A stacked (T * rank columns: FLOPs grow with T)
  merged    the reference: each row's weight W + scale * (B A)^T materialised, then one bmm
  compiled  `project` through torch.compile (with --compile)

Rows come in two orders: `mixed`, rows of all diffs interleaved as a length-sorted micro-batch gives
them, and `grouped`, each diff's rows together (what `project` turns into one bmm per diff). Every
method's output and gradients are checked against `project`'s. Reported per method and order:
milliseconds per forward+backward over all adapted layers, the part above `base`, aten ops dispatched
(a proxy for kernel launches), and peak memory above the inputs on CUDA. JSON to --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from shapes import CONFIGS, layer_shapes  # noqa: E402

from dit_core.io import write_json_atomic  # noqa: E402
from dit_core.modeling.lora import DiffModel  # noqa: E402
from dit_core.testing.syncs import OpsSeen  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Case:
    """One layer shape's inputs: x (b, s, in), the diffs' factors, the base weight, the rows' diffs."""

    def __init__(self, fan_in: int, fan_out: int, T: int, n: int, s: int, r: int, order: str, device, dtype,
                 autocast: bool, seed: int):
        """T diffs of rank r, n rows of s tokens each; `autocast`: run under bf16 autocast."""
        g = torch.Generator().manual_seed(seed)
        self.autocast = autocast
        self.base = nn.Linear(fan_in, fan_out, bias=False).to(device, dtype).requires_grad_(False)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5)
        self.x = torch.randn(T * n, s, fan_in, generator=g).to(device, dtype)
        self.A = (torch.randn(T, r, fan_out, generator=g) * 0.02).to(device)  # fp32 factors, as trained
        self.B = (torch.randn(T, fan_in, r, generator=g) * 0.02).to(device)
        rows = [d for d in range(T) for _ in range(n)]
        if order == "mixed":  # interleaved, as a length-sorted micro-batch of many diffs
            perm = torch.randperm(len(rows), generator=g).tolist()
            rows = [rows[i] for i in perm]
        self.host_rows = rows
        self.rows = torch.tensor(rows, device=device)
        self.grad_out = torch.randn(T * n, s, fan_out, generator=g).to(device, dtype)
        holder = nn.Module()
        holder.layers = nn.ModuleList([nn.ModuleDict({"proj": self.base})])
        self.dm = DiffModel(holder)  # wraps the base layer in a DiffLinear, as the trainer does
        self.layer = self.dm.layers["layers.0.proj"]
        # Rows of each diff, for the methods that take them in diff order.
        by_diff: dict[int, list[int]] = {}
        for b, d in enumerate(rows):
            by_diff.setdefault(d, []).append(b)
        self.segments = sorted(by_diff.items())

    def leaves(self):
        return (self.x.clone().requires_grad_(True), self.A.clone().requires_grad_(True),
                self.B.clone().requires_grad_(True))


def m_base(c: Case, x, A, B):
    return c.base(x)


def _install(c: Case, A, B) -> None:
    """The diffs into the case's DiffLinear, rows picking by c.rows, as the trainer installs them."""
    c.dm.set_diffs({"layers.0.proj": A}, {"layers.0.proj": B})
    c.dm.set_row_index(c.rows, host_index=c.host_rows)


def m_project(c: Case, x, A, B):
    _install(c, A, B)
    return c.layer(x)


def m_loop(c: Case, x, A, B):
    y = c.base(x)
    parts = []
    for d, rows in c.segments:
        idx = torch.tensor(rows, device=x.device)
        xd = x.index_select(0, idx)
        parts.append((idx, (xd @ B[d].to(x.dtype)) @ A[d].to(x.dtype)))
    for idx, p in parts:
        y = y.index_add(0, idx, p)
    return y


def m_concat(c: Case, x, A, B):
    T, r = A.shape[0], A.shape[1]
    B_all = B.permute(1, 0, 2).reshape(B.shape[1], T * r).to(x.dtype)  # (in, T*r)
    h = (x @ B_all).view(*x.shape[:2], T, r)  # every row against every diff
    own = torch.nn.functional.one_hot(c.rows, T).to(x.dtype)[:, None, :, None]  # (b, 1, T, 1)
    h = (h * own).reshape(*x.shape[:2], T * r)
    return c.base(x) + h @ A.reshape(T * r, -1).to(x.dtype)


def m_merged(c: Case, x, A, B):
    W = c.base.weight.t()[None] + torch.bmm(B[c.rows], A[c.rows]).to(x.dtype)  # (b, in, out)
    return torch.bmm(x, W)


def m_compiled(c: Case, x, A, B):
    """`project` with the layer's forward through torch.compile (the diffs installed eagerly)."""
    _install(c, A, B)
    if "compiled" not in c.__dict__:
        c.compiled = torch.compile(c.layer, dynamic=False)
    return c.compiled(x)


METHODS = {"base": m_base, "project": m_project, "loop": m_loop, "concat": m_concat, "merged": m_merged}


def run_once(fn, c: Case):
    x, A, B = c.leaves()
    with torch.autocast(c.x.device.type, dtype=torch.bfloat16, enabled=c.autocast, cache_enabled=False):
        y = fn(c, x, A, B)
    y.backward(c.grad_out.to(y.dtype))
    return y.detach(), x.grad, A.grad, B.grad


def ops_and_peak(fn, cases: list[tuple[Case, int]], device) -> tuple[int, int | None]:
    """Aten ops of one forward+backward over one layer of each shape (None for a compiled method), and
    (CUDA) its peak bytes above the inputs; after a warm-up run (and compilation)."""
    for c, _ in cases:
        run_once(fn, c)
    ops = None
    if fn is not m_compiled:  # a dispatch mode would run the compiled graph op by op
        with OpsSeen() as ops:
            for c, _ in cases:
                run_once(fn, c)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        for c, _ in cases:
            run_once(fn, c)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    return (None if ops is None else len(ops.names)), peak


def time_methods(methods: dict, cases: list[tuple[Case, int]], device, repeats: int) -> dict[str, float]:
    """Median ms of one forward+backward over every case (each weighted by its count), per method; the
    methods take turns in every repeat, so a drift in the machine's speed touches them all alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            total = 0.0
            for c, weight in cases:
                _sync(device)
                t0 = time.perf_counter()
                run_once(fn, c)
                _sync(device)
                total += (time.perf_counter() - t0) * weight
            times[name].append(total * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def max_rel_err(got, ref) -> float:
    return max(float((g.double() - r.double()).norm() / r.double().norm().clamp(min=1e-30))
               for g, r in zip(got, ref))


def bench(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    counts: dict[tuple[int, int], int] = {}
    for shape in layer_shapes(args.shapes).values():
        counts[shape] = counts.get(shape, 0) + 1
    methods = dict(METHODS)
    if args.compile:
        methods["compiled"] = m_compiled
    out = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "autocast": args.autocast,
           "shapes": args.shapes,
           "rank": args.rank, "rows_per_diff": args.rows, "seq": args.seq, "torch": torch.__version__,
           "cuda": torch.version.cuda if device.type == "cuda" else None, "runs": []}
    for T in args.T:
        for order in ("mixed", "grouped"):
            cases = [(Case(fi, fo, T, args.rows, args.seq, args.rank, order, device, dtype, args.autocast == "bf16",
                           seed=i), w) for i, ((fi, fo), w) in enumerate(counts.items())]
            refs = [run_once(m_project, c) for c, _ in cases]
            chosen, rows = {}, {}
            for name, fn in methods.items():
                if name == "merged" and T * args.rows * max(fi * fo for fi, fo in counts) * 4 > args.merged_limit:
                    rows[name] = {"T": T, "order": order, "method": name, "skipped": "per-row weights too large"}
                    continue
                n_ops, peak = ops_and_peak(fn, cases, device)
                rows[name] = {"T": T, "order": order, "method": name, "aten_ops_per_shape_set": n_ops,
                              "peak_mb": None if peak is None else round(peak / 2**20, 1)}
                if name != "base":
                    got = [run_once(fn, c) for c, _ in cases]
                    rows[name]["max_rel_err"] = max(max_rel_err(g, r) for g, r in zip(got, refs))
                chosen[name] = fn
            ms = time_methods(chosen, cases, device, args.repeats)
            for name, row in rows.items():
                if name in ms:
                    row["ms"] = round(ms[name], 3)
                    if name != "base":
                        row["above_base_ms"] = round(ms[name] - ms["base"], 3)
                    n_ops = row["aten_ops_per_shape_set"]
                    print(f"T={T:4d} {order:7s} {name:9s} {ms[name]:9.2f} ms  ops {'-' if n_ops is None else n_ops:>6}"
                          + ("" if name == "base" else
                             f"  +{row['above_base_ms']:8.2f} ms over base  err {row['max_rel_err']:.1e}")
                          + ("" if row["peak_mb"] is None else f"  peak {row['peak_mb']:8.1f} MiB"),
                          file=sys.stderr, flush=True)
                out["runs"].append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(CONFIGS), default="smollm2-135m",
                    help="the model whose adapted layers are timed (bench/shapes.py)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="activations and base weights (auto: bf16 on CUDA, fp32 on a CPU)")
    ap.add_argument("--T", type=int, nargs="+", default=[12], help="diffs in the micro-batch")
    ap.add_argument("--rows", type=int, default=3, help="rows per diff")
    ap.add_argument("--seq", type=int, default=48, help="tokens per row")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--autocast", choices=["off", "bf16"], default="off",
                    help="bf16 autocast around the forward (as model.autocast on a CPU with native bf16)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time `project` through torch.compile")
    ap.add_argument("--merged-limit", type=float, default=8e9, help="bytes of per-row weights above which `merged` is skipped")
    ap.add_argument("--out", default=str(ROOT / "reports/bench/lora_delta.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    res = bench(args)
    write_json_atomic(args.out, res)  # makes the folder
    return res


if __name__ == "__main__":
    main()
