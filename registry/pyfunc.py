"""An MLflow pyfunc wrapper around squeezeflow's own loader.

`mlflow.pyfunc.load_model("models:/NAME@champion").predict(["some text"])` returns
embeddings (encoders) or greedy continuations (causal LMs) from the compressed model.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import mlflow.utils.environment

ARTIFACT_KEY = "model"  # the compressed model folder inside the logged pyfunc model
# What `log_model(python_model=...)` gets: the path of a code file, logged as code and
# run on load (MLflow "models from code"), never a pickled object.
PYFUNC_CODE = str(Path(__file__).with_name("pyfunc_entry.py"))
_MLFLOW_CHECK = threading.Lock()  # guards the swap of MLflow's requirement check


def log_pyfunc_model(run_id: str, model_dir: str, pip_requirements: list[str]) -> str:
    """Log `model_dir` as the pyfunc model of run `run_id`; returns the model's URI."""
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings(), \
            _requirement_check_skipped_when(installed(pip_requirements)):
        # the fluent run is thread-local and closed right after
        warnings.filterwarnings("ignore", message="Passing a Python object")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=PYFUNC_CODE,  # logged as code, nothing unpickled on load
            artifacts={ARTIFACT_KEY: model_dir},
            pip_requirements=pip_requirements,
        )
    return str(info.model_uri)


def installed(pip_requirements: list[str]) -> bool:
    """Whether every requirement is a plain `name==version` pin of the version installed here."""
    for line in pip_requirements:
        name, pin, pinned = line.partition("==")
        if not pin or not pinned or any(c in line for c in " ;,<>!~@[*"):
            return False  # markers, ranges, extras, URLs: left to MLflow's check
        try:
            if version(name) != pinned:
                return False
        except (PackageNotFoundError, ValueError):
            return False
    return True


@contextmanager
def _requirement_check_skipped_when(skip: bool) -> Iterator[None]:
    """Without MLflow's check of a logged model's requirements against this environment.

    The check maps every installed distribution to its modules first
    (`importlib_metadata.packages_distributions`: 2.2 s on 2 cores with torch's CUDA
    wheels, at the first registration of every process). Requirements pinned to the
    versions installed here (`installed`, what squeezeflow logs) cannot mismatch, so the
    check is skipped for them; any other requirements are checked as MLflow does.
    """
    if not skip:
        yield
        return
    with _MLFLOW_CHECK:
        check = mlflow.utils.environment.warn_dependency_requirement_mismatches
        mlflow.utils.environment.warn_dependency_requirement_mismatches = _no_check
        try:
            yield
        finally:
            mlflow.utils.environment.warn_dependency_requirement_mismatches = check


def _no_check(model_requirements: list[str]) -> None:
    """Stands in for MLflow's check while requirements are known to be installed."""


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
