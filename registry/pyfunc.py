"""An MLflow pyfunc wrapper around squeezeflow's own loader.

`mlflow.pyfunc.load_model("models:/NAME@champion").predict(["some text"])` returns
embeddings (encoders) or greedy continuations (causal LMs) from the compressed model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

ARTIFACT_KEY = "model"  # the compressed model folder inside the logged pyfunc model
# What `log_model(python_model=...)` gets: the path of a code file, logged as code and
# run on load (MLflow "models from code"), never a pickled object.
PYFUNC_CODE = str(Path(__file__).with_name("pyfunc_entry.py"))


class CompressedModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    def load_context(self, context: Any) -> None:
        from squeezeflow.compression.artifact import load_compressed

        # the packed runtime: quantized Linears on packed int kernels, as users load them;
        # the folder is checked against its manifest first (IntegrityError names the file)
        self.loaded = load_compressed(context.artifacts[ARTIFACT_KEY], runtime="packed")

    def predict(
        self, context: Any, model_input: list[str], params: dict[str, Any] | None = None
    ) -> Any:
        import torch

        from squeezeflow.compression.families import family

        texts = _texts(model_input)
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            # embeddings (encoders) or greedy completions (causal LMs): the family says
            return family(self.loaded.kind).serve(model, tokenizer, batch, params or {})


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column].tolist()]
    return [str(t) for t in model_input]
