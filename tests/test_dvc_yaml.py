"""dvc.yaml cannot go stale: every dit_core module a stage's code imports is under one of its deps,
every stage the CLI runs has a DVC stage, and outputs follow params.yaml `paths`."""

import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# The stage bodies (tasks/stage_runs.py), their MLflow runs (tasks/tracking.py) and the stage functions
# (dit_core/stages.py) are followed
# function by function; any other module counts whole, with everything it imports.
BY_FUNCTION = {"tasks.stage_runs": ROOT / "tasks" / "stage_runs.py", "tasks.tracking": ROOT / "tasks" / "tracking.py",
               "dit_core.stages": ROOT / "dit_core" / "stages.py"}


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imports(node: ast.AST, module: str) -> list[tuple[str, list[str]]]:
    """(module, names) of every import under `node` (names: what `from m import a, b` takes)."""
    out = []
    skip = {id(x) for n in ast.walk(node) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
            for b in n.body for x in ast.walk(b)}  # annotations only: never imported at run time
    for n in ast.walk(node):
        if id(n) in skip:
            continue
        if isinstance(n, ast.Import):
            out += [(a.name, []) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.append((n.module, [a.name for a in n.names]))
    return out


class Closure:
    def __init__(self):
        self.modules: set[str] = set()
        self.functions: set[tuple[str, str]] = set()

    def add_import(self, module: str, names: list[str]) -> None:
        if module in BY_FUNCTION:
            for name in names:
                self.add_function(module, name)
            return
        for sub in [f"{module}.{n}" for n in names if _module_file(f"{module}.{n}")] or [module]:
            self.add_module(sub)

    def add_module(self, module: str) -> None:
        if not module.startswith(("dit_core", "tasks")) or module in self.modules:
            return
        f = _module_file(module)
        if f is None:
            return
        self.modules.add(module)
        for m, names in _imports(ast.parse(f.read_text()), module):
            self.add_import(m, names)

    def add_function(self, module: str, name: str) -> None:
        if (module, name) in self.functions:
            return
        self.functions.add((module, name))
        tree = ast.parse(BY_FUNCTION[module].read_text())
        top = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        if name not in top:
            return
        fn = top[name]
        used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        for m, names in _imports(fn, module):
            self.add_import(m, names)
        for stmt in tree.body:  # module-level imports this function uses
            if isinstance(stmt, ast.ImportFrom) and stmt.module:
                taken = [a.name for a in stmt.names if (a.asname or a.name) in used]
                if taken:
                    self.add_import(stmt.module, taken)
        for other in used & set(top):
            self.add_function(module, other)


STAGE_BODIES = {"download": ["download"], "make_data": ["make_data"],
                "generate_diffs": ["generate_diffs", "prepare_diffs", "train_shard", "finalize_diffs"],
                "assemble": ["assemble"], "train_interpreter": ["train_interpreter"], "evaluate": ["evaluate"],
                "scaling": ["scaling"]}


def test_every_cli_stage_has_a_dvc_stage():
    from flows.cli import STAGE_NAMES

    assert {n.replace("-", "_") for n in STAGE_NAMES} == set(DVC) == set(STAGE_BODIES)
    for name, stage in DVC.items():
        assert stage["cmd"] == f"dit stage {name.replace('_', '-')}"


@pytest.mark.parametrize("stage", sorted(STAGE_BODIES))
def test_stage_deps_cover_every_dit_core_module_it_imports(stage):
    c = Closure()
    for fn in STAGE_BODIES[stage]:
        c.add_function("tasks.stage_runs", fn)
    files = {_module_file(m) for m in c.modules if m.startswith("dit_core")}
    files |= {BY_FUNCTION[m] for m, _ in c.functions if m.startswith("dit_core")}
    assert files, "the closure found no dit_core code: the analysis is broken"
    deps = [ROOT / d for d in DVC[stage]["deps"] if d.startswith("dit_core")]
    uncovered = sorted(str(f.relative_to(ROOT)) for f in files
                       if not any(f == d or d in f.parents for d in deps) and f.name != "__init__.py")
    assert uncovered == [], f"dvc.yaml stage {stage} imports these without depending on them"


def test_outputs_follow_params_paths():
    for name, stage in DVC.items():
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert path.startswith(("${paths.data}/", "${paths.models}/", "${paths.reports}/")), (name, path)
