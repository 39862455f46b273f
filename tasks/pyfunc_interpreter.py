"""MLflow pyfunc model of a trained interpreter, logged as "model from code" (nothing is pickled).

    model = mlflow.pyfunc.load_model("models:/dit-interpreter@champion")
    model.predict(["path/to/peft_adapter_dir", "path/to/diffs.safetensors"])

Input: weight-diff references (diff .safetensors files, PEFT adapter dirs, or stored diff ids) as a
list of strings or a DataFrame with a `diff` column. Output: one description per diff; with
`params={"details": True}` one record per diff instead: diff, description, confidence, margin, best_label,
unsure, no_behavior (docs/confidence.md).

The model travels without the training machine: `dit_core` rides along as logged code, third-party
packages are pinned in its requirements, and the base model is recorded by identity
(`model_config["base_model"]`: source, id, revision, sha256), not by path. On load the base model is
found in this machine's model cache, `$DIT_MODEL_CACHE` (default `~/.cache/dit/models`): fetched there
through the download stage when missing (an embedded or hub model is downloaded; a `local` directory or
`gguf` file must exist at the recorded id), and refused when its weights' sha256 differs from the
recorded one.

Stored diff ids are looked up in diff stores: the project-relative ones recorded at registration
(resolved against the working directory, skipped where absent), or those a caller passes, as
`load_model(uri, model_config={"stores": [...]})` or `predict(refs, params={"stores": [...]})`.
An interpreter trained on several behaviours answers the question of `params={"behavior": "news"}`
(default: its first behaviour's).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class InterpreterModel(PythonModel):
    """Loads base model + interpreter once; predict describes diffs."""

    def load_context(self, context) -> None:
        from pathlib import Path

        from dit_core.modeling.models import (
            ModelSourceError,
            load_model,
            model_cache_root,
            resolve_recorded_model,
        )

        cfg = context.model_config or {}
        if "base_model" not in cfg:
            raise ModelSourceError("model_config has no base_model (source, id, revision, sha256) to find the "
                                   "base model by; register the interpreter again (`dit stage train-interpreter`)")
        base_dir = resolve_recorded_model(cfg["base_model"], model_cache_root())
        self.lm = load_model(base_dir, cfg.get("device", "auto"), cfg.get("dtype", "auto"))
        self.interpreter_dir = context.artifacts["interpreter"]
        self.stores = [Path(s) for s in cfg.get("stores") or []]
        self.modules = cfg.get("modules", ".*")

    def predict(self, context, model_input, params=None):
        from pathlib import Path

        from dit_core.interpreter.describe import describe

        if hasattr(model_input, "columns"):
            refs = [str(x) for x in model_input["diff"]]
        elif isinstance(model_input, str):
            refs = [model_input]
        else:
            refs = [str(x) for x in model_input]
        stores = [Path(s) for s in (params or {}).get("stores") or []] or self.stores
        df = describe(self.lm, self.interpreter_dir, refs, stores, self.modules,
                      behavior=(params or {}).get("behavior") or None)
        if (params or {}).get("details"):
            return df.to_dicts()
        return df["description"].to_list()


mlflow.models.set_model(InterpreterModel())
