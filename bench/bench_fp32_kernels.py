"""fp32 linear products on a CPU by torch's matmul and by oneDNN's linear, per layer shape.

    python bench/bench_fp32_kernels.py                       # SmolLM2-135M's layer shapes, 2048 / 288 / 8 rows
    python bench/bench_fp32_kernels.py --shapes tiny --rows 16 --repeats 1   # smoke run

`model.fp32_linear: auto` runs a model's frozen fp32 linears on oneDNN's kernels on AMD CPUs, where they
are faster than torch's matmul (MKL in torch's x86 wheels); `onednn` does so anywhere. This shows whether
that pays on the machine at hand: it times, for each distinct
(in, out) shape of the model's adapted layers (bench/shapes.py) and each row count, the two products a
frozen linear does in training: the forward x W^T and the input gradient g W (oneDNN's from a
transposed view of W, as `RoutedLinear` runs it), best of --repeats with the two kernels taking turns,
and checks that both give the same result. Reported per shape: TFLOP/s of each and their ratio, plus
one larger product timed the same way (`larger_product`). JSON to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from shapes import CONFIGS, layer_shapes  # noqa: E402

from dit_core.io import write_json_atomic  # noqa: E402
from dit_core.modeling.lora import onednn_linear  # noqa: E402
from dit_core.modeling.models import onednn_fp32_usable  # noqa: E402


def best_seconds(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function over `repeats` rounds (after one warm-up round), taking turns."""
    best = {k: float("inf") for k in fns}
    for i in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def larger_product(rows: int = 512, width: int = 1024, repeats: int = 5) -> tuple[float | None, str]:
    """oneDNN's fp32 linear against torch's matmul on one (rows, width) x (width, width) product:
    (speedup, what was seen); None where oneDNN's op is not usable here."""
    usable, why = onednn_fp32_usable()
    if not usable:
        return None, why
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, width, generator=g), torch.randn(width, width, generator=g) / width ** 0.5
    with torch.no_grad():
        best = best_seconds({"torch": lambda: x @ w.t(), "onednn": lambda: onednn_linear(x, w)}, repeats)
    ratio = best["torch"] / best["onednn"]
    return ratio, (f"a {rows}x{width} @ {width}x{width} fp32 product: torch {best['torch'] * 1e3:.2f} ms, "
                   f"oneDNN {best['onednn'] * 1e3:.2f} ms ({ratio:.2f}x)")


def bench(args) -> dict:
    shapes = sorted(set(layer_shapes(args.shapes).values()))
    g = torch.Generator().manual_seed(0)
    out = {"shapes": args.shapes, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "probe": larger_product()[1], "runs": []}
    with torch.no_grad():
        for rows in args.rows:
            for fan_in, fan_out in shapes:
                x = torch.randn(rows, fan_in, generator=g)
                w = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
                grad = torch.randn(rows, fan_out, generator=g)
                fns = {"torch_forward": lambda: x @ w.t(), "onednn_forward": lambda: onednn_linear(x, w),
                       "torch_input_grad": lambda: grad @ w, "onednn_input_grad": lambda: onednn_linear(grad, w.t())}
                err = max(float(((onednn_linear(x, w) - x @ w.t()).abs().max() / (x @ w.t()).abs().max())),
                          float(((onednn_linear(grad, w.t()) - grad @ w).abs().max() / (grad @ w).abs().max())))
                secs = best_seconds(fns, args.repeats)
                flops = 2 * rows * fan_in * fan_out
                row = {"rows": rows, "in": fan_in, "out": fan_out, "max_rel_err": err}
                row |= {f"{k}_tflops": round(flops / s / 1e12, 4) for k, s in secs.items()}
                for part in ("forward", "input_grad"):
                    row[f"{part}_speedup"] = round(secs[f"torch_{part}"] / secs[f"onednn_{part}"], 2)
                print(f"{rows:5d} x {fan_in:5d} x {fan_out:5d}  forward {row['torch_forward_tflops']:.3f} / "
                      f"{row['onednn_forward_tflops']:.3f}  input grad {row['torch_input_grad_tflops']:.3f} / "
                      f"{row['onednn_input_grad_tflops']:.3f} TFLOP/s (torch / oneDNN)  err {err:.1e}",
                      file=sys.stderr, flush=True)
                out["runs"].append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(CONFIGS), default="smollm2-135m",
                    help="the model whose layer shapes are timed (bench/shapes.py)")
    ap.add_argument("--rows", type=int, nargs="+", default=[2048, 288, 8],
                    help="rows of x (a micro-batch's tokens; 8: a generation step)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "reports/bench/fp32_kernels.json"))
    args = ap.parse_args(argv)
    res = bench(args)
    write_json_atomic(args.out, res)  # makes the folder
    return res


if __name__ == "__main__":
    main()
