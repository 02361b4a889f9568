"""Run a recipe's `evaluation: tasks:` (evaluation/task_specs.py) on one loaded model.

Causal LMs go through lm-evaluation-harness: its `HFLM` wraps our model object as it
was loaded (the packed runtime, so the accuracy is that of the kernels a user runs),
and the task is built from its local YAML with the data files made absolute. Encoders
are scored on labelled JSONL files (evaluation/labelled.py).

Returns metrics `task_<name>_<metric>` and `..._stderr`, and tags: the task's version
(`task_<name>_version`, from the YAML's `metadata.version` or the spec) and the
sha256 of what it read (`task_<name>_sha256`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from squeezeflow.compression.models import LoadedModel
from squeezeflow.evaluation.labelled import retrieval_scores, similarity_spearman
from squeezeflow.evaluation.task_specs import (
    LmEvalTask,
    RetrievalTask,
    SimilarityTask,
    TaskSpec,
    data_sha256,
    find_task_yaml,
    local_data_files,
    metric_name,
    metric_prefix,
)

log = logging.getLogger(__name__)

Embed = Callable[[LoadedModel, list[str]], torch.Tensor]  # texts -> (n, dim) embeddings
TASK_KINDS = {"lm-eval": "causal-lm", "similarity": "encoder", "retrieval": "encoder"}


def check_kinds(tasks: tuple[TaskSpec, ...], model_kind: str) -> None:
    """Every task must suit the model's kind; checked before any task runs."""
    wrong = [f"tasks.{i} ({t.name}): a {t.kind} task needs a {TASK_KINDS[t.kind]}"
             for i, t in enumerate(tasks) if TASK_KINDS[t.kind] != model_kind]
    if wrong:
        raise ValueError(f"the model is a {model_kind}; " + "; ".join(wrong))


def run_tasks(
    loaded: LoadedModel, tasks: tuple[TaskSpec, ...], embed: Embed, max_length: int
) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of every task on `loaded`."""
    check_kinds(tasks, loaded.kind)
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for spec in tasks:
        prefix = metric_prefix(spec.name)
        if isinstance(spec, LmEvalTask):
            scores, version = run_lm_eval(loaded, spec, max_length)
        elif isinstance(spec, SimilarityTask):
            scores, version = _similarity(loaded, spec, embed), spec.version
        else:
            scores, version = _retrieval(loaded, spec, embed), spec.version
        metrics |= scores
        tags[prefix + "version"] = version
        tags[prefix + "sha256"] = data_sha256(spec)
        log.info("task %s: %s", spec.name, {k: round(v, 4) for k, v in scores.items()})
    return metrics, tags


def run_lm_eval(loaded: LoadedModel, spec: LmEvalTask, max_length: int) -> tuple[dict[str, float], str]:
    """({task_<name>_<metric>: value, ..._stderr: value}, version) of one lm-eval task."""
    # lm-eval imports ~3 s of packages (datasets, evaluate, sqlitedict...): only here
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, _yaml_loader

    path = find_task_yaml(spec)
    # lm-eval's own loader, so `!function` helpers beside the YAML resolve as it does
    config: dict[str, Any] = _yaml_loader.load_yaml(path, resolve_func=True, recursive=True)
    config = local_data_files(config, path.parent)
    model = HFLM(
        pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=spec.batch_size,
        max_length=max_length,
    )
    results = lm_eval.simple_evaluate(
        model=model, tasks=[config],
        task_manager=TaskManager(include_path=str(path.parent), include_defaults=False),
        num_fewshot=spec.num_fewshot, limit=spec.limit, bootstrap_iters=spec.bootstrap_iters,
        log_samples=False,
    )
    if results is None or spec.name not in results["results"]:
        raise RuntimeError(f"lm-eval returned no results for task {spec.name!r}")
    scores = {
        metric_name(spec.name, key): float(value)
        for key, value in results["results"][spec.name].items()
        if "," in key and isinstance(value, int | float) and not isinstance(value, bool)
    }
    # lm-eval writes "N/A" where it has no stderr (bootstrap_iters=0): absent, not a number
    return scores, str(results.get("versions", {}).get(spec.name, "unversioned"))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object")
            rows.append(row)
    return rows


def _similarity(loaded: LoadedModel, spec: SimilarityTask, embed: Embed) -> dict[str, float]:
    rows = _jsonl(Path(spec.path))
    missing = [i for i, row in enumerate(rows, 1) if not {"text1", "text2", "score"} <= row.keys()]
    if missing:
        raise ValueError(f"{spec.path}: lines {missing[:5]} lack text1, text2 or score")
    first = embed(loaded, [str(row["text1"]) for row in rows])  # (n, dim)
    second = embed(loaded, [str(row["text2"]) for row in rows])  # (n, dim)
    gold = torch.tensor([float(row["score"]) for row in rows])  # (n,)
    rho, stderr = similarity_spearman(first, second, gold)
    prefix = metric_prefix(spec.name)
    return {prefix + "spearman": rho, prefix + "spearman_stderr": stderr}


def _retrieval(loaded: LoadedModel, spec: RetrievalTask, embed: Embed) -> dict[str, float]:
    rows = _jsonl(Path(spec.path))
    documents = [row for row in rows if "id" in row and "text" in row]
    queries = [row for row in rows if "query" in row]
    if not documents or not queries:
        raise ValueError(f"{spec.path}: needs documents {{id, text}} and queries {{query, relevant}}")
    index = {str(row["id"]): i for i, row in enumerate(documents)}
    relevant = []
    for row in queries:
        unknown = [d for d in row.get("relevant", []) if str(d) not in index]
        if unknown or not row.get("relevant"):
            raise ValueError(f"{spec.path}: query {row['query']!r} names unknown or no relevant "
                             f"documents {unknown}")
        relevant.append({index[str(d)] for d in row["relevant"]})
    scores = retrieval_scores(
        embed(loaded, [str(row["query"]) for row in queries]),
        embed(loaded, [str(row["text"]) for row in documents]), relevant, spec.k,
    )
    prefix = metric_prefix(spec.name)
    metrics: dict[str, float] = {}
    for name, (mean, stderr) in scores.items():
        metrics[prefix + name] = mean
        metrics[prefix + name + "_stderr"] = stderr
    return metrics
