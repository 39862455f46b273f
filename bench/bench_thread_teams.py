"""The same CPU training step in one thread, and in a second thread while the first keeps its OpenMP team.

    python bench/bench_thread_teams.py                  # 3 rounds of 40 steps per arrangement
    python bench/bench_thread_teams.py --steps 4 --rounds 1   # smoke run

torch's CPU kernels run on OpenMP (libgomp in torch's wheels), and OpenMP gives each thread that starts a
parallel region a team of its own, which lives as long as that thread. Two teams on the same cores make
more threads than cores; libgomp then cuts its spin-waiting short, so every parallel region of the busy
team waits on the kernel to wake its threads. Training steps launch thousands of small parallel regions,
and a step that runs in a second thread while the main thread still holds a team is much slower than the
same step in one thread. This is why the pipeline trains its local shards in the thread that runs the
flow (flows/pipeline.py) rather than on a thread pool.

Each arrangement runs in a fresh process (teams outlive the work that made them), the arrangements
taking turns, best round reported:

- one-thread: the step in the main thread;
- worker-thread: the step in a second thread, the main thread never ran a parallel region;
- two-teams: the main thread ran one parallel region first (its team stays), then the step in a
  second thread: what a task on a thread pool does after the flow's thread loaded a model.

The step is a stack of SmolLM2-135M-sized linear layers (hidden 576) with residual adds and a backward,
many small kernels as in a diff step. JSON to --out: ms per step per arrangement, each one's ratio to
one-thread, and where each ran (main thread or not, the process's threads counted during the step).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARRANGEMENTS = ("one-thread", "worker-thread", "two-teams")


def step_ms(steps: int, rows: int, hidden: int, layers: int) -> float:
    """Mean milliseconds of a forward and backward through `layers` linear layers with residual adds."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen, requires_grad=True)
    weights = [torch.randn(hidden, hidden, generator=gen) * hidden ** -0.5 for _ in range(layers)]

    def step() -> None:
        y = x
        for w in weights:
            y = torch.nn.functional.silu(y @ w) + y
        y.square().mean().backward()

    for _ in range(3):  # warm-up: the allocator and the kernels' first calls
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e3


def os_threads() -> int:
    """Threads of this process, OpenMP's included (Linux; 0 where /proc is missing)."""
    task = Path("/proc/self/task")
    return len(list(task.iterdir())) if task.exists() else 0


def child(arrangement: str, steps: int, rows: int, hidden: int, layers: int) -> dict:
    """One arrangement in this process: the step's ms, where it ran, and the process's threads after it."""
    import torch

    if arrangement == "one-thread":
        ms = step_ms(steps, rows, hidden, layers)
        return {"ms": ms, "main_thread": True, "os_threads": os_threads()}
    if arrangement == "two-teams":
        a = torch.ones(1024, 1024)
        (a @ a).sum()  # a parallel region in the main thread: its OpenMP team stays alive with the thread
    out: dict = {}

    def work() -> None:
        out["ms"] = step_ms(steps, rows, hidden, layers)
        out["main_thread"] = threading.current_thread() is threading.main_thread()
        out["os_threads"] = os_threads()  # while this thread and its team are alive

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return out


def run(steps: int, rounds: int, rows: int, hidden: int, layers: int) -> dict:
    """Every arrangement `rounds` times, each in a fresh process, taking turns; best ms per arrangement."""
    best = {a: float("inf") for a in ARRANGEMENTS}
    seen: dict[str, dict] = {}
    for _ in range(rounds):
        for arrangement in ARRANGEMENTS:
            cmd = [sys.executable, __file__, "--child", arrangement, "--steps", str(steps), "--rows", str(rows),
                   "--hidden", str(hidden), "--layers", str(layers)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            best[arrangement] = min(best[arrangement], res["ms"])
            seen[arrangement] = {k: res[k] for k in ("main_thread", "os_threads")}
    import torch

    return {
        "ms_per_step": best,
        "ratio_to_one_thread": {a: best[a] / best["one-thread"] for a in ARRANGEMENTS},
        "threads": seen,
        "torch_threads": torch.get_num_threads(),
        "steps": steps, "rounds": rounds, "rows": rows, "hidden": hidden, "layers": layers,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--child", choices=ARRANGEMENTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.rows, args.hidden, args.layers)))
        return {}
    result = run(args.steps, args.rounds, args.rows, args.hidden, args.layers)
    for a in ARRANGEMENTS:
        print(f"{a:14s} {result['ms_per_step'][a]:8.2f} ms/step  x{result['ratio_to_one_thread'][a]:.2f}")
    if args.out:
        from dit_core.io import write_json_atomic

        write_json_atomic(Path(args.out), result)
    else:
        print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
