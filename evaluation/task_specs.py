"""Task accuracy in a recipe: the `evaluation: tasks:` list, checked without loading a model.

Three kinds, one list; every task is run on the base and on the candidate, and its
metrics are named `task_<name>_<metric>` (the base's `base_task_<name>_<metric>`), with
`task_<name>_<metric>_stderr` beside each score:

```yaml
evaluation:
  data: {source: data/evaluation.txt}
  tasks:
    # causal LMs: an lm-evaluation-harness task defined by a local YAML whose dataset
    # is local files (`dataset_path: json` + `dataset_kwargs: {data_files: ...}`)
    - {kind: lm-eval, name: compression_facts, path: tasks/compression_facts}
    # encoders: JSONL pairs {"text1", "text2", "score"} -> task_<name>_spearman
    - {kind: similarity, name: sts_tiny, path: tasks/sts_tiny/pairs.jsonl}
    # encoders: JSONL documents {"id", "text"} and queries {"query", "relevant": [ids]}
    #   -> task_<name>_recall_at_<k> for each k, and task_<name>_mrr
    - {kind: retrieval, name: docs_tiny, path: tasks/docs_tiny/corpus.jsonl, k: [1, 5]}
gates:
  - {metric: task_compression_facts_acc, min: 0.6}
```

Relative paths resolve against the recipe's folder; an lm-eval task's relative
`data_files` resolve against its YAML's folder. A task whose data would come from the
hub (a `dataset_path` that is not a local builder or folder) is an error: evaluation
data is kept with the recipe.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from squeezeflow.compression.config import StrictModel

# lm-eval task names may use dots and dashes; MLflow metric names accept both
TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# `datasets` builders that read local files; any other dataset_path would be a hub name
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


class LmEvalTask(StrictModel):
    """A task of lm-evaluation-harness, on the causal LM (loglikelihood and generation)."""

    kind: Literal["lm-eval"] = "lm-eval"
    name: str = Field(pattern=TASK_NAME)  # the `task:` its YAML defines
    path: str  # that YAML file, or a folder holding it (searched recursively)
    num_fewshot: int = Field(0, ge=0)  # zero-shot: the tiny default tasks have no few-shot split
    limit: int | None = Field(None, ge=1)  # first N documents only (None: all)
    # 1000 resamples give stderr of non-mean metrics to ~3 % (lm-eval's default is 100000,
    # minutes on a CPU); mean metrics such as acc have a closed-form stderr anyway
    bootstrap_iters: int = Field(1000, ge=0)
    batch_size: int = Field(16, ge=1)  # requests per forward


class SimilarityTask(StrictModel):
    """Labelled sentence pairs for encoders: Spearman of embedding cosine vs the gold score."""

    kind: Literal["similarity"] = "similarity"
    name: str = Field(pattern=TASK_NAME)
    path: str  # JSONL: {"text1": ..., "text2": ..., "score": gold similarity}
    version: str = "1"  # bump when the file's meaning changes; logged as a tag


class RetrievalTask(StrictModel):
    """Labelled retrieval for encoders: recall@k of cosine nearest documents."""

    kind: Literal["retrieval"] = "retrieval"
    name: str = Field(pattern=TASK_NAME)
    # JSONL: documents {"id": ..., "text": ...} and queries {"query": ..., "relevant": [ids]}
    path: str
    k: tuple[int, ...] = Field((1, 5), min_length=1)  # cut-offs reported as recall_at_<k>
    version: str = "1"


TaskSpec = Annotated[LmEvalTask | SimilarityTask | RetrievalTask, Field(discriminator="kind")]


def metric_prefix(name: str) -> str:
    return f"task_{name}_"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- lm-eval task YAMLs, read without lm-eval (recipe validation stays fast) ----

class _TaskYamlLoader(yaml.SafeLoader):
    """Safe YAML that keeps lm-eval's `!function module.name` tags as plain strings."""


def _function_tag(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))  # type: ignore[arg-type]


_TaskYamlLoader.add_constructor("!function", _function_tag)


def read_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as a mapping (its `include:` merged underneath, as lm-eval does)."""
    raw = yaml.load(path.read_text(), Loader=_TaskYamlLoader)  # noqa: S506 (a SafeLoader)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    include = raw.pop("include", None)
    if isinstance(include, str):
        base = read_task_yaml((path.parent / include).resolve())
        raw = base | raw
    return raw


def find_task_yaml(spec: LmEvalTask) -> Path:
    """The YAML that defines `spec.name` under `spec.path`; errors name what was found."""
    root = Path(spec.path)
    if not root.exists():
        raise ValueError(f"path: {root} does not exist")
    candidates = [root] if root.is_file() else sorted(
        p for p in root.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")
    )
    found: list[str] = []
    for candidate in candidates:
        try:
            config = read_task_yaml(candidate)
        except (yaml.YAMLError, ValueError, OSError):
            continue
        task = config.get("task")
        if isinstance(task, str):
            found.append(task)
            if task == spec.name:
                return candidate
    raise ValueError(
        f"name: no task YAML under {root} defines task {spec.name!r}; "
        f"tasks found: {', '.join(found) or 'none'}"
    )


def local_data_files(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`config` with relative `dataset_kwargs.data_files` made absolute against `folder`
    (the YAML's); a dataset that is not local files is an error naming the field."""
    dataset_path = config.get("dataset_path")
    if dataset_path not in LOCAL_BUILDERS:
        local = folder / str(dataset_path) if dataset_path else None
        if local is None or not local.is_dir():
            raise ValueError(
                f"dataset_path: {dataset_path!r} would be read from the hub; evaluation tasks "
                f"read local files: use one of {', '.join(LOCAL_BUILDERS)} with "
                "dataset_kwargs: {data_files: ...}, or a folder beside the YAML"
            )
        return config | {"dataset_path": str(local.resolve())}
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        raise ValueError(f"dataset_kwargs.data_files: dataset_path {dataset_path!r} needs local data files")

    def resolve(entry: Any) -> Any:
        if isinstance(entry, str):
            path = Path(entry).expanduser()
            path = path if path.is_absolute() else folder / path
            if not path.is_file():
                raise ValueError(f"dataset_kwargs.data_files: {path} does not exist")
            return str(path.resolve())
        if isinstance(entry, list):
            return [resolve(item) for item in entry]
        if isinstance(entry, dict):
            return {split: resolve(item) for split, item in entry.items()}
        raise ValueError(f"dataset_kwargs.data_files: unsupported entry {entry!r}")

    kwargs["data_files"] = resolve(files)
    return config | {"dataset_kwargs": kwargs}


def check_task(spec: LmEvalTask | SimilarityTask | RetrievalTask) -> list[str]:
    """Errors (each naming its field) that would stop `spec` from running."""
    if isinstance(spec, LmEvalTask):
        try:
            path = find_task_yaml(spec)
            local_data_files(read_task_yaml(path), path.parent)
        except (ValueError, OSError, yaml.YAMLError) as error:
            return [str(error)]
        return []
    path = Path(spec.path)
    if not path.is_file():
        return [f"path: data file {path} does not exist"]
    return []


def data_sha256(spec: LmEvalTask | SimilarityTask | RetrievalTask) -> str:
    """One digest of what the task reads: its YAML and data files, or its JSONL."""
    if not isinstance(spec, LmEvalTask):
        return file_sha256(Path(spec.path))
    path = find_task_yaml(spec)
    config = local_data_files(read_task_yaml(path), path.parent)
    files = config.get("dataset_kwargs", {}).get("data_files", [])
    flat: list[str] = []
    stack = [files]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            flat.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        else:
            stack.extend(item)
    digest = hashlib.sha256(file_sha256(path).encode())
    for name in sorted(flat):
        digest.update(file_sha256(Path(name)).encode())
    return digest.hexdigest()


def metric_name(task: str, lm_eval_key: str) -> str:
    """lm-eval's `acc,none` / `acc_stderr,none` -> task_<task>_acc / ..._acc_stderr; a
    filter other than `none` is kept: `exact_match,strict-match` -> ..._exact_match_strict_match."""
    metric, _, filter_name = lm_eval_key.partition(",")
    stderr = metric.endswith("_stderr")
    metric = metric.removesuffix("_stderr")
    if filter_name and filter_name != "none":
        metric += "_" + re.sub(r"[^A-Za-z0-9_]", "_", filter_name)
    return metric_prefix(task) + metric + ("_stderr" if stderr else "")
