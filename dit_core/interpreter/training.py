"""Interpreter training recipe: setup -> train -> save (torchtune-style, one class).

    recipe = InterpreterRecipe(params, loaded_model, "data/dit_dataset", "models/interpreter")
    summary = recipe.run()

Each epoch ends with validation loss, a few sample generations and a checkpoint
(`checkpoints/last-<epoch>.safetensors`, `optimizer-<epoch>...`, `best-<epoch>...`, then `state.json`,
which names them and their sha256: a run killed while writing them resumes from the previous epoch's
files, which are deleted only after the new state.json is in place); a rerun resumes after the last
finished epoch. Early stopping on validation loss keeps the best epoch's weights.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import polars as pl
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dit_core.data.assemble import DitDataset
from dit_core.config import Params
from dit_core.diffs.bank import DiffBank
from dit_core.interpreter import data_parallel
from dit_core.interpreter.adapter import (
    InterpreterSpec,
    build_interpreter,
    check_file_sha256,
    label_example,
    save_interpreter,
)
from dit_core.interpreter.confidence import calibrate
from dit_core.io import atomic_path, compare_record, move_aside, write_json_atomic
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import LoadedModel, sha256_file
from dit_core.modeling.schedule import warmup_cosine
from dit_core.stop import check_stop
from dit_core.data.schemas import read_validated

log = logging.getLogger(__name__)
MetricLogger = Callable[[dict, int], None]
CURVE_FIELDS = ["step", "epoch", "train_loss", "val_loss", "lr"]  # train_log.csv


def dataset_version(path: Path) -> str:
    """sha256 (first 16 hex) of the dataset manifest: names the training data in the spec."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _optimizer_tensors(sd: dict) -> dict[str, torch.Tensor]:
    # Optimizer state as safetensors (no pickle): "<param index>.<key>" -> tensor.
    return {f"{i}.{k}": torch.as_tensor(v).contiguous() for i, st in sd["state"].items() for k, v in st.items()}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], template: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    return {"state": state, "param_groups": template["param_groups"]}


class InterpreterRecipe:
    """Train an interpreter on the train split, validate on val, keep the best epoch."""

    def __init__(self, p: Params, lm: LoadedModel, dataset_dir: str | Path, out_dir: str | Path,
                 log_metrics: MetricLogger | None = None, progress: bool = True):
        self.p, self.cfg, self.lm = p, p.interpreter, lm
        self.dataset_path = Path(dataset_dir) / "dataset.parquet"
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        # Under torchrun every rank trains on its part of each batch; only rank 0 logs and writes files.
        self.dp = data_parallel.current(lm.device.type)
        self.log_metrics = (log_metrics if self.dp.is_main else None) or (lambda m, s: None)
        self.progress = progress and self.dp.is_main
        # Reading a loss waits for the device: on an accelerator the step losses are read (and logged,
        # with their own step numbers) once per epoch, on a CPU after every step.
        self.read_losses_every_step = lm.device.type == "cpu"

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        df = read_validated(self.dataset_path, DitDataset)
        self.train_df = df.filter(pl.col("split") == "train")
        self.val_df = df.filter(pl.col("split") == "val")
        if self.train_df.height == 0:
            raise ValueError(f"{self.dataset_path}: no train diffs; rerun assemble with more diffs")
        self.dm = DiffModel(self.lm.model, self.p.diffs.modules)
        budget = int(self.cfg.diff_memory_mb * 2**20)
        self.bank = DiffBank(df, self.dm.shapes(), self.lm.sha256, cache_bytes=budget)
        # every epoch reads every diff: keep them on the device when they fit, else stream shards
        if not self.bank.preload(self.lm.device, max_bytes=budget):
            log.info("the %d diffs take more than interpreter.diff_memory_mb=%g MiB: streaming their shards from "
                     "disk each epoch", df.height, self.cfg.diff_memory_mb)
        # Each behaviour keeps its own question; the spec records them all (`question`: the first one's).
        from dit_core.behaviors import get_behavior

        fit = pl.concat([self.train_df, self.val_df])
        present = set(fit["behavior"])  # what it learns from (test rows may hold other behaviours)
        order = [b for b in self.p.behaviors if b in present] + sorted(present - set(self.p.behaviors))
        questions = {b: get_behavior(b).question(self.p) for b in order}
        if self.cfg.kind == "projection" and len(set(questions.values())) > 1:
            raise ValueError(f"{self.dataset_path}: interpreter.kind=projection asks one question, but the dataset "
                             f"mixes behaviours {order} with their own questions; use interpreter.kind=lora")
        self.spec = InterpreterSpec(
            kind=self.cfg.kind, question=questions[order[0]], questions=questions,
            rank=self.cfg.rank, alpha=self.cfg.alpha,
            modules=self.p.diffs.modules, base_model=self.lm.name, base_sha256=self.lm.sha256,
            data_version=dataset_version(self.dataset_path), n_soft_tokens=self.cfg.n_soft_tokens,
            projection_hidden=self.cfg.projection_hidden, projection_lora=self.cfg.projection_lora,
            null_answer=self.cfg.null_answer if self.cfg.null_rate > 0 else None, null_rate=self.cfg.null_rate)
        torch.manual_seed(self.cfg.seed)
        self.interp = build_interpreter(self.dm, self.spec, self.lm.tokenizer, self.cfg.init_std)
        self.opt = torch.optim.AdamW(self.interp.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        self.examples = {(b, lab): label_example(self.lm.tokenizer, questions[b], lab)
                         for b, lab in fit.select("behavior", "label").unique().iter_rows()}
        # No-behaviour rows (interpreter.null_rate): answered null_answer, asked each behaviour's question.
        self.n_null = max(1, round(self.cfg.null_rate * self.train_df.height)) if self.cfg.null_rate > 0 else 0
        if self.n_null:
            clash = fit.filter(pl.col("label") == self.cfg.null_answer)
            if clash.height:
                raise ValueError(f"{self.dataset_path}: interpreter.null_answer={self.cfg.null_answer!r} is the label of "
                                 f"{clash.height} diffs (e.g. {clash['diff_id'][0]}); set another null_answer or "
                                 "interpreter.null_rate=0")
            self.examples |= {(b, self.cfg.null_answer): label_example(self.lm.tokenizer, q, self.cfg.null_answer)
                              for b, q in questions.items()}
        rows_per_epoch = self.train_df.height + self.n_null
        steps_per_epoch = math.ceil(rows_per_epoch / (self.cfg.batch_size * self.cfg.grad_accum))
        self.total_steps = steps_per_epoch * self.cfg.epochs
        self.state = {"epoch": 0, "step": 0, "best_val": None, "best_epoch": None, "bad_epochs": 0,
                      "spec": self.spec.__dict__}
        self._resume()

    def _resume(self) -> None:
        state_file = self.ckpt_dir / "state.json"
        if self.dp.is_main:
            self._set_aside_stale(state_file)
        self.dp.barrier()  # data-parallel: every rank reads what rank 0 left
        if compare_record(state_file, {"spec": self.state["spec"]}) != []:  # [] : a checkpoint of this setup
            return  # nothing to resume (no checkpoint, or it was set aside)
        self.state = json.loads(state_file.read_text())
        self.interp.load_state(self._load_checkpoint("last"))
        self.opt.load_state_dict(_optimizer_from_tensors(self._load_checkpoint("optimizer"), self.opt.state_dict()))
        saved = self.state
        if self.dp.is_main:
            self._trim_curve(saved["epoch"])
        log.info("resuming interpreter training after epoch %d", saved["epoch"])

    def _set_aside_stale(self, state_file: Path) -> None:
        changed = compare_record(state_file, {"spec": self.state["spec"]})
        if changed:
            # New data or settings (e.g. scheduled retraining): start over, keeping the old run aside.
            stale = move_aside(self.ckpt_dir)
            (self.out_dir / "train_log.csv").unlink(missing_ok=True)
            log.warning("checkpoint in %s is for another setup (%s changed); moved to %s, training from scratch",
                        self.ckpt_dir, ", ".join(changed), stale)

    def _trim_curve(self, epoch: int) -> None:
        """Drop curve rows of epochs after `epoch`: a run killed between logging an epoch and its
        checkpoint would otherwise log that epoch twice."""
        path = self.out_dir / "train_log.csv"
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["epoch"]) <= epoch]
        if len(keep) != len(rows):
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
                w.writeheader()
                w.writerows(keep)

    # -- train ---------------------------------------------------------------------------------
    def _lr(self, step: int) -> float:
        return self.cfg.lr * warmup_cosine(step, self.total_steps, self.cfg.warmup_steps, floor=0.05,
                                           cosine=self.cfg.schedule == "cosine")

    def _epoch_rows(self, epoch: int) -> pl.DataFrame:
        """The epoch's training rows, shuffled: every training diff once and `n_null` no-behaviour rows
        (`null` true), each a copy of a random training row (so its behaviour's question) with label
        null_answer, which `_batch` gives the zero diff."""
        seed = self.cfg.seed + epoch
        if not self.n_null:
            return self.train_df.sample(fraction=1.0, shuffle=True, seed=seed)
        n, height = self.n_null, self.train_df.height
        copies = self.train_df.sample(n=n, with_replacement=n > height, shuffle=True, seed=seed)
        nulls = copies.with_columns(label=pl.lit(self.cfg.null_answer), null=pl.lit(True))
        real = self.train_df.with_columns(null=pl.lit(False))
        return pl.concat([real, nulls]).sample(fraction=1.0, shuffle=True, seed=seed)

    def _batch(self, rows: pl.DataFrame):
        ids = rows["diff_id"].to_list()
        A, B, scale = self.bank.get(ids)
        if "null" in rows.columns and rows["null"].any():  # no-behaviour rows: the zero diff
            keep = torch.tensor((~rows["null"]).to_list()).view(-1, 1, 1)
            A = {k: v * keep.to(v.device, v.dtype) for k, v in A.items()}
            B = {k: v * keep.to(v.device, v.dtype) for k, v in B.items()}
        dev = self.lm.device
        A = {k: v.to(dev) for k, v in A.items()}
        B = {k: v.to(dev) for k, v in B.items()}
        return A, B, scale.to(dev), [self.examples[key] for key in zip(rows["behavior"], rows["label"])]

    @torch.no_grad()
    def evaluate_loss(self, df: pl.DataFrame) -> float | None:
        """Mean label cross-entropy over a split (None when the split is empty)."""
        if df.height == 0:
            return None
        losses = []
        for i in range(0, df.height, self.cfg.batch_size):
            rows = df.slice(i, self.cfg.batch_size)
            first, n = self.dp.part(rows.height)  # this rank's rows (all of them in one process)
            if n:
                A, B, scale, ex = self._batch(rows.slice(first, n))
                losses += self.interp.row_losses(A, B, scale, ex, self.lm.tokenizer.pad_token_id).tolist()
        return self.dp.mean(losses, self.lm.device)

    def _samples(self, df: pl.DataFrame) -> list[dict]:
        rows = df.head(self.cfg.n_samples)
        if rows.height == 0:
            return []
        A, B, scale, _ = self._batch(rows)
        preds = self.interp.describe(self.lm.tokenizer, (A, B, scale), list(range(rows.height)),
                                     self.cfg.max_new_tokens)
        return [{"diff_id": d, "label": lab, "prediction": pr}
                for d, lab, pr in zip(rows["diff_id"], rows["label"], preds)]

    def _checkpoint(self) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        epoch, files = self.state["epoch"], dict(self.state.get("files", {}))
        tensors = {"last": {k: v.contiguous() for k, v in self.interp.state().items()},
                   "optimizer": _optimizer_tensors(self.opt.state_dict())}
        if self.state["best_epoch"] == epoch:
            tensors["best"] = tensors["last"]
        hashes: dict[str, str] = {}
        for kind, t in tensors.items():
            name = f"{kind}-{epoch:04d}.safetensors"
            with atomic_path(self.ckpt_dir / name) as tmp:
                save_file(t, str(tmp))
            files[kind] = name
        for name in files.values():
            hashes[name] = self.state.get("sha256", {}).get(name) or sha256_file(self.ckpt_dir / name)
        self.state.update(files=files, sha256=hashes)  # checked before a resume or the save reads them
        write_json_atomic(self.ckpt_dir / "state.json", self.state)  # last: marks the epoch done
        for old in self.ckpt_dir.glob("*.safetensors"):  # the previous epoch's files, now unreferenced
            if old.name not in files.values():
                old.unlink(missing_ok=True)

    def _load_checkpoint(self, kind: str) -> dict[str, torch.Tensor]:
        name = self.state.get("files", {}).get(kind, f"{kind}.safetensors")  # older checkpoints: fixed names
        path = self.ckpt_dir / name
        recorded = self.state.get("sha256", {}).get(name)
        if recorded is not None:
            check_file_sha256(path, recorded, f"delete {self.ckpt_dir} to train from scratch")
        return load_file(str(path))

    def _append_curve(self, row: dict) -> None:
        path = self.out_dir / "train_log.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)

    def train(self) -> None:
        cfg, pad = self.cfg, self.lm.tokenizer.pad_token_id
        rng = random.Random(cfg.seed)
        for _ in range(self.state["epoch"]):
            rng.random()  # keep shuffles reproducible across resumes
        while self.state["epoch"] < cfg.epochs and self.state["bad_epochs"] < cfg.patience:
            epoch = self.state["epoch"]
            order = self._epoch_rows(epoch)
            micro = [order.slice(i, cfg.batch_size) for i in range(0, order.height, cfg.batch_size)]
            bar = tqdm(range(0, len(micro), cfg.grad_accum), desc=f"interpreter epoch {epoch + 1}/{cfg.epochs}",
                       disable=not self.progress)
            losses: list[float] = []
            pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss on the device)
            for start in bar:
                check_stop()
                lr = self._lr(self.state["step"])
                for g in self.opt.param_groups:
                    g["lr"] = lr
                self.opt.zero_grad(set_to_none=True)
                group = micro[start : start + cfg.grad_accum]
                total = torch.zeros((), device=self.lm.device)
                for rows in group:
                    # Data-parallel: this rank's part of the micro-batch, weighted by its share of the rows,
                    # so the gradients summed over ranks are the whole micro-batch's (factor 1 in one process).
                    first, n = self.dp.part(rows.height)
                    if n == 0:
                        continue  # more ranks than rows: this rank adds nothing
                    A, B, scale, ex = self._batch(rows.slice(first, n))
                    loss = self.interp.loss_with_grad(A, B, scale, ex, pad) * (n / rows.height) / len(group)
                    loss.backward()
                    total = total + loss.detach()
                total = self.dp.sum_gradients(self.interp.parameters(), total)
                self.opt.step()
                self.dm.clear_diffs()
                self.state["step"] += 1
                pending.append((self.state["step"], lr, total))
                if self.read_losses_every_step or start + cfg.grad_accum >= len(micro):
                    values = torch.stack([t for _, _, t in pending]).tolist()
                    for (step, step_lr, _), value in zip(pending, values):
                        self.log_metrics({"train_loss": value, "lr": step_lr}, step)
                    losses += values
                    pending = []
                    bar.set_postfix(loss=f"{values[-1]:.3f}", lr=f"{lr:.1e}")
            train_loss = sum(losses) / len(losses)
            val_loss = self.evaluate_loss(self.val_df)
            monitored = val_loss if val_loss is not None else train_loss
            self.state["epoch"] = epoch + 1
            if self.state["best_val"] is None or monitored < self.state["best_val"] - 1e-4:
                self.state.update(best_val=monitored, best_epoch=epoch + 1, bad_epochs=0)
            else:
                self.state["bad_epochs"] += 1
            samples = self._samples(self.val_df if self.val_df.height else self.train_df) if self.dp.is_main else []
            self.state["samples"] = samples
            if not self.dp.is_main:
                continue  # rank 0 logs and writes the epoch's checkpoint
            self._append_curve({"step": self.state["step"], "epoch": epoch + 1, "train_loss": train_loss,
                                "val_loss": val_loss, "lr": self._lr(self.state["step"])})
            self.log_metrics({"epoch_train_loss": train_loss, **({"val_loss": val_loss} if val_loss is not None else {})},
                             self.state["step"])
            log.info("epoch %d: train %.4f val %s samples %s", epoch + 1, train_loss,
                     f"{val_loss:.4f}" if val_loss is not None else "-", samples[:2])
            self._checkpoint()

    # -- save ----------------------------------------------------------------------------------
    def save(self) -> dict:
        if not self.dp.is_main:  # data-parallel: rank 0 writes the interpreter
            return {k: self.state[k] for k in ("epoch", "step", "best_val", "best_epoch")}
        best = self.ckpt_dir / self.state.get("files", {}).get("best", "best.safetensors")
        state = self._load_checkpoint("best") if best.exists() else self.interp.state()
        # The kept weights give each behaviour's label vocabulary and unsure threshold (chosen on val).
        self.interp.load_state(state)
        labels, calibration = calibrate(self.interp, self.lm.tokenizer, self.spec.questions or {}, self.train_df,
                                        self.val_df, self.bank, self.lm.device, self.cfg.unsure_accuracy,
                                        self.cfg.batch_size, self.spec.null_answer)
        save_interpreter(self.out_dir, replace(self.spec, labels=labels, calibration=calibration), state)
        summary = {k: self.state[k] for k in ("epoch", "step", "best_val", "best_epoch")}
        summary.update(n_train=self.train_df.height, n_null=self.n_null, n_val=self.val_df.height, kind=self.spec.kind,
                       data_version=self.spec.data_version, samples=self.state.get("samples", []),
                       calibration=calibration)
        write_json_atomic(self.out_dir / "summary.json", summary)
        return summary

    def run(self) -> dict:
        """setup -> train -> save; returns the summary."""
        t0 = time.time()
        self.setup()
        self.train()
        summary = self.save()
        summary["seconds"] = round(time.time() - t0, 1)
        return summary
