"""MLflow pyfunc model of a trained interpreter, logged as "model from code" (nothing is pickled).

    model = mlflow.pyfunc.load_model("models:/dit-interpreter@champion")
    model.predict(["path/to/peft_adapter_dir", "data/diffs/hidden_topic/shard-00000.safetensors"])

Input: weight-diff references (diff .safetensors files, PEFT adapter dirs, or stored diff ids) as a
list of strings or a DataFrame with a `diff` column. Output: one description per diff.
The base model is not copied into the registry: `model_config["base_model_dir"]` names its HF directory.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class InterpreterModel(PythonModel):
    """Loads base model + interpreter once; predict describes diffs."""

    def load_context(self, context) -> None:
        from pathlib import Path

        from dit_core.modeling.models import load_model

        cfg = context.model_config or {}
        self.lm = load_model(cfg["base_model_dir"], cfg.get("device", "auto"), cfg.get("dtype", "auto"))
        self.interpreter_dir = context.artifacts["interpreter"]
        self.stores = [Path(s) for s in cfg.get("stores", [])]
        self.modules = cfg.get("modules", ".*")

    def predict(self, context, model_input, params=None):
        from dit_core.interpreter.describe import describe

        if hasattr(model_input, "columns"):
            refs = [str(x) for x in model_input["diff"]]
        elif isinstance(model_input, str):
            refs = [model_input]
        else:
            refs = [str(x) for x in model_input]
        df = describe(self.lm, self.interpreter_dir, refs, self.stores, self.modules)
        return df["description"].to_list()


mlflow.models.set_model(InterpreterModel())
