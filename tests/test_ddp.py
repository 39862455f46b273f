"""Data-parallel interpreter training: `dit stage train-interpreter` under torchrun with 2 CPU processes
(gloo) on the tiny model. Killed mid-training and rerun under torchrun, it ends with the single-process
run's adapter within float tolerance (each batch is split over the ranks, so the global batch and the
result do not depend on the number of processes); only rank 0 writes (one curve row per epoch)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import PARAMS, ROOT, section, tiny_overrides
from dit_core.config import load_params

EPOCHS = 30


def _setup(model_dir, root):
    """A toy diff store (label -> fixed direction) assembled into root/data/dit_dataset; the stage's params."""
    from test_interpreter import make_toy_store

    from dit_core.data.assemble import assemble
    from dit_core.modeling.models import load_model
    from tasks.stage_runs import download

    sets = tiny_overrides(model_dir, root / "data") + [
        f"paths.models={root}/models", f"paths.reports={root}/reports", "tracking.enabled=false",
        "interpreter.rank=4", "interpreter.alpha=4", "interpreter.lr=0.01", f"interpreter.epochs={EPOCHS}",
        f"interpreter.patience={EPOCHS}", "interpreter.warmup_steps=2", "interpreter.n_samples=0",
        # micro-batches of 3 rows split 2 + 1 over the ranks, 2 of them per optimizer step
        "interpreter.batch_size=3", "interpreter.grad_accum=2"]
    download(load_params(PARAMS, sets).model_dump())
    make_toy_store(root / "diffs", load_model(model_dir, "cpu", "float32"), per_label=4)
    assemble([root / "diffs"], root / "data" / "dit_dataset",
             section("assemble", val_fraction=0.25, test_fraction=0.25, min_trigger_hit=0.5,
                     max_wrong_prefix_hit=0.5, max_no_trigger_hit=0.25))
    return sets


def _command(sets, nproc):
    stage = ["-m", "flows.cli", "stage", "train-interpreter", "--engine", "local", *[a for s in sets for a in ("--set", s)]]
    if nproc == 1:
        return [sys.executable, *stage]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *stage]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(sets, nproc):
    out = subprocess.run(_command(sets, nproc), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_process_training_killed_and_resumed_equals_one_process(tiny_model_dir, tmp_path):
    single = _setup(tiny_model_dir, tmp_path / "single")
    _run(single, 1)

    ddp = _setup(tiny_model_dir, tmp_path / "ddp")
    out = tmp_path / "ddp" / "models" / "interpreter"
    state = out / "checkpoints" / "state.json"
    proc = subprocess.Popen(_command(ddp, 2), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = json.loads(state.read_text())["epoch"]
    assert 2 <= done < EPOCHS and not (out / "interpreter.json").exists(), "not killed mid-training"

    _run(ddp, 2)  # resumes after the last finished epoch, on both ranks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epoch"] == EPOCHS
    with open(out / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))  # rank 0 alone wrote, none lost

    want_dir = tmp_path / "single" / "models" / "interpreter"
    with open(want_dir / "train_log.csv") as f:
        want_rows = list(csv.DictReader(f))
    for a, b in zip(rows, want_rows):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-4)
    got = load_file(str(out / "interpreter.safetensors"))
    want = load_file(str(want_dir / "interpreter.safetensors"))
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_rank_parts_cover_each_batch_once():
    from dit_core.interpreter.data_parallel import DataParallel

    for world in (1, 2, 3, 4):
        for n in range(0, 9):
            parts = [DataParallel(r, world).part(n) for r in range(world)]
            rows = [i for start, length in parts for i in range(start, start + length)]
            assert rows == list(range(n)), (world, n, parts)
            assert max(p[1] for p in parts) - min(p[1] for p in parts) <= 1


def test_other_stages_refuse_to_run_under_torchrun(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "assemble", "--engine", "local",
                          "--set", f"paths.data={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "only train-interpreter runs data-parallel" in out.stderr


def _sum_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    from dit_core.interpreter.data_parallel import DataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        both, one, none = (torch.nn.Parameter(torch.zeros(2, 3)) for _ in range(3))
        both.grad = torch.full((2, 3), float(rank + 1))  # 1 + 2
        if rank == 1:
            one.grad = torch.arange(6.0).view(2, 3)  # only rank 1 has a gradient here
        loss = DataParallel(rank, 2).sum_gradients([both, one, none], torch.tensor(0.25 * (rank + 1)))
        from safetensors.torch import save_file

        save_file({"both": both.grad, "one": one.grad, "none": torch.tensor(none.grad is None),
                   "loss": loss.reshape(1)}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_gradients_and_loss_are_summed_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sum_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert torch.equal(got["both"], torch.full((2, 3), 3.0))
        assert torch.equal(got["one"], torch.arange(6.0).view(2, 3))  # zeros from rank 0 added
        assert got["none"].item() is True  # no rank had a gradient: the optimizer skips it, as in one process
        assert got["loss"].item() == pytest.approx(0.75)
