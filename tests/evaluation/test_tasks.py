"""Task accuracy: local lm-eval tasks on causal LMs, labelled similarity/retrieval on encoders.

The multiple-choice task is made from the generator the tiny Llama is trained on
(squeezeflow/sampledata.py): the context is a sentence cut where its last three words
fix the next word, and the distractors are words that follow the last word elsewhere
(so a model that only knows word pairs cannot tell them apart; one that reads the
context can). A trained model scores ~1.0; 2-bit RTN breaks enough of the layers that
read the context to score clearly lower.
"""

from __future__ import annotations

import collections
import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml

from squeezeflow import sampledata
from squeezeflow.compression.artifact import load_compressed, save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.evaluation.labelled import retrieval_scores, similarity_spearman
from squeezeflow.evaluation.task_specs import LmEvalTask, check_task, metric_name

TASK = "next_word"
TASK_YAML = {
    "task": TASK,
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": "items.jsonl"}},  # relative to the YAML
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "{{context}}",
    "doc_to_choice": "choices",
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 2.0},
}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)  # the tiny tokenizer's word split


def next_word_items(count: int, seed: int = 77) -> list[dict[str, object]]:
    """Multiple-choice items: the context's last 3 words fix the next word (seen >= 20
    times, always the same), the last 2 do not, and the 3 distractors follow the last
    word elsewhere in the generator's text."""
    follows: dict[int, dict[tuple[str, ...], collections.Counter[str]]] = {
        n: collections.defaultdict(collections.Counter) for n in (1, 2, 3)
    }
    for sentence in sampledata.sentences(4000, seed=1000):  # 4000: every 3-word context seen often
        words = _words(sentence)
        for i in range(1, len(words)):
            for n in (1, 2, 3):
                if i >= n:
                    follows[n][tuple(words[i - n : i])][words[i]] += 1

    def decided_by_context(words: list[str], i: int) -> bool:
        three, two, one = (follows[n][tuple(words[i - n : i])] for n in (3, 2, 1))
        return sum(three.values()) >= 20 and len(three) == 1 and len(two) >= 2 and len(one) >= 4

    rng = random.Random(seed)
    items: list[dict[str, object]] = []
    for sentence in sampledata.sentences(400, seed=seed):
        words = _words(sentence)
        positions = [i for i in range(3, len(words)) if decided_by_context(words, i)]
        if not positions:
            continue
        i = rng.choice(positions)
        others = sorted(set(follows[1][(words[i - 1],)]) - {words[i]})
        choices = [words[i], *rng.sample(others, 3)]
        rng.shuffle(choices)
        items.append({"context": " ".join(words[:i]), "choices": choices,
                      "answer": choices.index(words[i])})
        if len(items) == count:
            break
    return items


def write_task(folder: Path, count: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text(
        "".join(json.dumps(item) + "\n" for item in next_word_items(count))
    )
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(TASK_YAML))
    return folder


@pytest.fixture(scope="module")
def rtn2_llama_dir(trained_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(trained_llama_dir)
    run_stage_steps(model, [CATALOG.build(CATALOG.parse({"kind": "rtn", "bits": 2, "group_size": 64}))])
    return save_compressed(model, tokenizer, "causal-lm", tmp_path_factory.mktemp("rtn2") / "m")


def test_lm_eval_keys_become_task_metric_names() -> None:
    assert metric_name("arc", "acc,none") == "task_arc_acc"
    assert metric_name("arc", "acc_stderr,none") == "task_arc_acc_stderr"
    assert metric_name("gsm", "exact_match,strict-match") == "task_gsm_exact_match_strict_match"


def test_a_task_reading_the_hub_or_missing_is_an_error(tmp_path: Path) -> None:
    folder = write_task(tmp_path / "task", count=4)
    assert check_task(LmEvalTask(name=TASK, path=str(folder))) == []
    assert "tasks found: next_word" in check_task(LmEvalTask(name="other", path=str(folder)))[0]
    hub = dict(TASK_YAML, dataset_path="allenai/ai2_arc")
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(hub))
    assert "would be read from the hub" in check_task(LmEvalTask(name=TASK, path=str(folder)))[0]
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(TASK_YAML))
    (folder / "items.jsonl").unlink()
    assert "items.jsonl does not exist" in check_task(LmEvalTask(name=TASK, path=str(folder)))[0]


@pytest.mark.slow
def test_two_bit_rtn_scores_lower_through_lm_eval(
    trained_llama_dir: Path, rtn2_llama_dir: Path, tmp_path: Path
) -> None:
    from squeezeflow.evaluation.task_accuracy import run_tasks

    spec = LmEvalTask(name=TASK, path=str(write_task(tmp_path / "task")), batch_size=32)
    scores = {}
    for label, folder in (("base", trained_llama_dir), ("rtn2", rtn2_llama_dir)):
        loaded = load_compressed(folder, runtime="packed")  # what the evaluation suite runs
        metrics, tags = run_tasks(loaded, (spec,), embed=lambda *_: torch.empty(0), max_length=64)
        assert tags["task_next_word_version"] == "2.0"
        assert len(tags["task_next_word_sha256"]) == 64
        assert 0.0 <= metrics["task_next_word_acc_stderr"] < 0.1  # 64 items: stderr <= 0.0625
        scores[label] = metrics["task_next_word_acc"]
    assert scores["base"] >= 0.9  # the context decides the answer and the model learned it
    assert scores["rtn2"] <= scores["base"] - 0.05, scores  # measured: 1.0 vs 0.86 on 66 items


# ---- encoders: labelled similarity and retrieval ----


def _words_of(text: str) -> set[str]:
    return set(_words(text.lower()))


def test_labelled_files_score_a_degraded_encoder_lower(tmp_path: Path) -> None:
    """Similarity and retrieval files through `run_tasks`: an encoder whose embeddings
    carry noise (a degraded model) gets a lower Spearman, recall@k and MRR."""
    from squeezeflow.compression.models import LoadedModel
    from squeezeflow.evaluation.task_accuracy import run_tasks
    from squeezeflow.evaluation.task_specs import RetrievalTask, SimilarityTask

    texts = sampledata.sentences(60, seed=3)
    # gold similarity: Jaccard overlap of the two sentences' words
    pairs = [{"text1": a, "text2": b,
              "score": len(_words_of(a) & _words_of(b)) / len(_words_of(a) | _words_of(b))}
             for a, b in zip(texts[:30], texts[30:], strict=True)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    # retrieval: each query is the first half of one sentence, which is its relevant document
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)] + [
        {"query": " ".join(t.split()[: len(t.split()) // 2]), "relevant": [f"d{i}"]}
        for i, t in enumerate(texts)
    ]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = (SimilarityTask(name="sts", path=str(tmp_path / "pairs.jsonl")),
             RetrievalTask(name="docs", path=str(tmp_path / "corpus.jsonl"), k=(1, 5)))
    vocabulary = {w: i for i, w in enumerate(sorted({w for t in texts for w in _words_of(t)}))}

    generator = torch.Generator().manual_seed(0)

    def bag_of_words(texts: list[str], noise: float) -> torch.Tensor:
        """A transparent encoder: word presence (n, vocab), plus Gaussian noise (fresh
        draws per call, so each side of a pair gets its own)."""
        out = torch.zeros(len(texts), len(vocabulary))
        for row, text in enumerate(texts):
            out[row, [vocabulary[w] for w in _words_of(text)]] = 1.0
        return out + noise * torch.randn(out.shape, generator=generator)

    loaded = LoadedModel(model=torch.nn.Identity(), tokenizer=None, kind="encoder", path=tmp_path)  # type: ignore[arg-type]
    clean, tags = run_tasks(loaded, tasks, lambda _, t: bag_of_words(t, 0.0), max_length=64)
    noisy, _ = run_tasks(loaded, tasks, lambda _, t: bag_of_words(t, 0.3), max_length=64)
    assert tags["task_sts_version"] == "1" and len(tags["task_docs_sha256"]) == 64
    # measured: Spearman 0.9997 -> 0.44, recall@5 1.0 -> 0.83, MRR 0.95 -> 0.57
    assert clean["task_sts_spearman"] > 0.95 and clean["task_sts_spearman_stderr"] < 0.05
    assert noisy["task_sts_spearman"] < clean["task_sts_spearman"] - 0.2
    assert clean["task_docs_recall_at_1"] <= clean["task_docs_recall_at_5"]  # recall grows with k
    assert noisy["task_docs_recall_at_5"] < clean["task_docs_recall_at_5"] - 0.05
    assert noisy["task_docs_mrr"] < clean["task_docs_mrr"] - 0.1
    assert 0 < clean["task_docs_recall_at_1_stderr"] < 0.1  # a mean over 60 queries


def test_retrieval_and_spearman_match_hand_computed_cases() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    documents = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.7, 0.7]])
    scores = retrieval_scores(queries, documents, [{1}, {1}], (1, 2))
    # query 0 ranks documents 0, 2, 1: its relevant one is third; query 1 ranks 1 first
    assert scores["recall_at_1"][0] == pytest.approx(0.5)
    assert scores["recall_at_2"][0] == pytest.approx(0.5)
    assert scores["mrr"][0] == pytest.approx((1 / 3 + 1) / 2)
    first = torch.tensor([[1.0, 0.0]] * 4)
    second = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.2]])
    rho, stderr = similarity_spearman(first, second, torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert rho == pytest.approx(1.0) and stderr == pytest.approx(0.0, abs=1e-6)
    rho, _ = similarity_spearman(first, second, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert rho == pytest.approx(-1.0)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_task_accuracy_gate_blocks_a_two_bit_version(
    workdir: Path, trained_llama_dir: Path, text_files: dict[str, Path]
) -> None:
    """Through a recipe: both scores and their stderr land on the MLflow run, the task's
    version on its tags, and a gate on task accuracy keeps the alias off the version."""
    from mlflow import MlflowClient

    from squeezeflow.flows.compress import compress

    write_task(workdir / "tasks" / TASK)
    recipe = {
        "name": "tiny-llama-rtn2",
        "model": {"source": str(trained_llama_dir)},
        "evaluation": {
            "data": {"source": str(text_files["evaluation"]), "num_samples": 16},
            "max_length": 64, "suites": ["quality"],
            "tasks": [{"kind": "lm-eval", "name": TASK, "path": f"tasks/{TASK}", "batch_size": 32}],
        },
        "stages": [{"name": "quantize", "steps": [{"kind": "rtn", "bits": 2, "group_size": 64}]}],
        "gates": [{"metric": f"task_{TASK}_acc", "min": 0.95}],
        "registration": {"model_name": "tiny-llama-rtn2"},
    }
    path = workdir / "recipe.yaml"  # the task path resolves against the recipe's folder
    path.write_text(yaml.safe_dump(recipe))
    result = compress(str(path))

    client = MlflowClient()
    version = client.get_model_version("tiny-llama-rtn2", result.registered.version)
    assert version.aliases == [] and version.tags["gate"] == "failed"
    assert version.tags["gate.0"].startswith(f"fail: task_{TASK}_acc >= 0.95")
    run = client.get_run(version.run_id)
    metrics = run.data.metrics
    assert metrics[f"base_task_{TASK}_acc"] >= 0.9
    assert metrics[f"task_{TASK}_acc"] < metrics[f"base_task_{TASK}_acc"]
    for name in (f"task_{TASK}_acc_stderr", f"base_task_{TASK}_acc_stderr"):
        assert 0.0 <= metrics[name] < 0.1, name
    assert run.data.tags[f"squeezeflow.task_{TASK}_version"] == "2.0"


def test_the_bundled_task_reads_only_local_files() -> None:
    """recipes/tasks/sentence_endings, the example the README points at, passes the same
    check a recipe's task gets: its YAML names the task, its data is local, it parses."""
    folder = Path(__file__).resolve().parents[2] / "recipes" / "tasks" / "sentence_endings"
    assert check_task(LmEvalTask(name="sentence_endings", path=str(folder))) == []
    items = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines() if line]
    assert len(items) >= 10 and all(0 <= item["answer"] < len(item["choices"]) for item in items)
