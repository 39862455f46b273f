"""DVC versioning of the retraining corpus: after a round, `dvc add` its new store and the dataset.

Orchestration, not science: it lives beside the Prefect tasks and MLflow tracking, and dit_core never
calls DVC. The round itself has finished (round.json written) before any of this runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from dit_core.config import Params

log = logging.getLogger("dit_core.retrain")


def _dvc_root(path: Path) -> Path | None:
    for d in [path.resolve(), *path.resolve().parents]:
        if (d / ".dvc").is_dir():
            return d
    return None


def _dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip()[-2000:]
        hint = (" (set retrain.dir to a folder git does not ignore: DVC writes a .dvc file beside each store)"
                if "git-ignored" in err else "")
        raise RuntimeError(
            f"`dvc {' '.join(args)}` failed in {root} (exit {res.returncode}): {err}{hint}\n"
            "The round itself has finished (round.json is written); fix the cause and run that command by "
            "hand, or let the next round add what is still untracked")
    return res.stdout


def dvc_version(p: Params, plan: dict) -> dict:
    """`dvc add` the round's store and the dataset (and any store not tracked yet, such as the benchmark
    in round 1 or a round whose versioning failed); `dvc push` them when retrain.dvc_push is set."""
    store = Path(plan["store"])
    if not p.retrain.dvc_add:
        return _skip("retrain.dvc_add is false: the corpus is not versioned with DVC")
    root = _dvc_root(store)
    if root is None:
        return _skip(f"{store} is not inside a DVC repository (no .dvc folder above it): not versioned; "
                     "run `dvc init` in the project to version the corpus")
    if importlib.util.find_spec("dvc") is None:
        return _skip("dvc is not installed: the corpus is not versioned (pip install dvc)")
    earlier = [Path(s) for s in (plan["benchmark"], *plan["stores"][:-1])]
    targets = [store, Path(plan["dataset"]),
               *(s for s in earlier if s.is_dir() and not s.with_name(f"{s.name}.dvc").is_file())]
    rel = [os.path.relpath(t.resolve(), root) for t in targets]
    _dvc(root, "add", "--quiet", *rel)
    log.info("dvc: tracked %s in %s (commit the .dvc files with git)", ", ".join(rel), root)
    if p.retrain.dvc_push:
        _dvc(root, "push", *(f"{r}.dvc" for r in rel))
    return {"tracked": rel, "pushed": p.retrain.dvc_push, "repo": str(root)}


def _skip(message: str) -> dict:
    log.info("%s", message)
    return {"tracked": [], "skipped": message}
