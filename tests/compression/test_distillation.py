"""Distillation: healing a depth-pruned LM, a half-depth encoder student, resume after
SIGKILL, a NaN loss, and teacher/student pairs that cannot be distilled."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from squeezeflow import sampledata
from squeezeflow.compression.artifact import load_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.models import find_blocks, mean_pooled_embeddings
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.compression.step import StepReport, TrainingContext
from squeezeflow.evaluation.fidelity import mean_cosine
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.testing import save_model, tiny_bert, tiny_llama, train_causal_lm


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block tiny Llama trained for a few seconds (25% of its blocks = 1 block)."""
    model, tokenizer = tiny_llama(hidden=64, layers=4, intermediate=128)
    train_causal_lm(model, tokenizer, steps=150)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("distill") / "llama4")


@pytest.fixture(scope="module")
def bert4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block tiny BERT whose blocks matter: at the default init (std 0.02) the blocks
    barely move the embeddings (a half-depth copy keeps cosine 0.999); block weights
    scaled by 5 make a half-depth copy lose about half of it."""
    model, tokenizer = tiny_bert(hidden=64, layers=4, intermediate=128)
    with torch.no_grad():
        for module in model.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(5.0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("distill") / "bert4")


def batches(tokenizer, count: int, seed: int, batch_size: int = 16):  # type: ignore[no-untyped-def]
    texts = sampledata.sentences(count, seed=seed)
    return list(tokenized_batches(texts, tokenizer, batch_size=batch_size, max_length=32))


def distill(model, teacher: Path, training, folder: Path, **options) -> StepReport:  # type: ignore[no-untyped-def]
    step = CATALOG.build(CATALOG.parse({"kind": "distill", **options}))
    context = TrainingContext(batches=training, folder=folder, teacher=teacher, seed=0)
    [report] = run_stage_steps(model, [step], training=context)
    return report


def test_distillation_recovers_half_the_perplexity_lost_to_depth_pruning(
    llama4_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    loaded = load_compressed(llama4_dir)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    held_out = batches(tokenizer, 64, seed=12)
    base = perplexity(teacher, held_out)

    student = copy.deepcopy(teacher)
    depth = CATALOG.build(CATALOG.parse({"kind": "depth", "fraction": 0.25}))
    run_stage_steps(student, [depth], batches(tokenizer, 32, seed=11))
    assert student.config.num_hidden_layers == 3
    pruned = perplexity(student, held_out)
    assert pruned > base * 1.01  # removing a block costs measurable perplexity

    report = distill(student, llama4_dir, batches(tokenizer, 256, seed=13), tmp_path / "ckpt",
                     max_steps=60, lr=1e-3, warmup_steps=5)
    healed = perplexity(student, held_out)
    recovered = (pruned - healed) / (pruned - base)
    assert recovered >= 0.5, f"base {base:.4f}, pruned {pruned:.4f}, distilled {healed:.4f}"
    assert report.metrics["steps"] == 60
    # curves: loss by step, every log_every steps, falling
    loss = report.curves["loss"]
    assert [step for step, _ in loss] == [10, 20, 30, 40, 50, 60]
    assert loss[-1][1] < loss[0][1]
    assert {"loss.logits", "loss.hidden", "lr", "grad_norm"} <= set(report.curves)


def test_half_depth_encoder_student_gains_embedding_fidelity(bert4_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaded = load_compressed(bert4_dir)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    student = copy.deepcopy(teacher)
    builder = CATALOG.build(CATALOG.parse({"kind": "student", "keep_every": 2}))
    run_stage_steps(student, [builder])
    assert student.config.num_hidden_layers == 2 and len(find_blocks(student)[1]) == 2

    held_out = batches(tokenizer, 64, seed=12, batch_size=64)[0]

    def fidelity() -> float:
        with torch.no_grad():
            ours = mean_pooled_embeddings(student, held_out["input_ids"], held_out["attention_mask"])
            theirs = mean_pooled_embeddings(teacher, held_out["input_ids"], held_out["attention_mask"])
        return mean_cosine(theirs, ours)

    before = fidelity()
    assert before < 0.8  # the student starts far from its teacher
    report = distill(student, bert4_dir, batches(tokenizer, 256, seed=13), tmp_path / "ckpt",
                     max_steps=40, lr=1e-3, warmup_steps=5, eval_every=10, validation_batches=2)
    after = fidelity()
    assert after > before + 0.5 * (1 - before), f"fidelity before {before:.4f}, after {after:.4f}"
    assert {"loss.embedding", "loss.hidden", "validation_loss"} <= set(report.curves)
    assert report.metrics["best_validation_loss"] <= report.curves["validation_loss"][0][1]

    # the student folder loads back with transformers as a 2-block model
    from transformers import AutoModel

    save_model(student, tokenizer, tmp_path / "student")
    reloaded = AutoModel.from_pretrained(tmp_path / "student")
    assert reloaded.config.num_hidden_layers == 2


KILLED_RUN = """
import sys, torch
from pathlib import Path
from squeezeflow.compression.artifact import load_compressed
from tests.compression.test_distillation import batches, distill
teacher = Path(sys.argv[1])
loaded = load_compressed(teacher)
distill(loaded.model, teacher, batches(loaded.tokenizer, 128, seed=13), Path(sys.argv[2]),
        losses={"logits": 1.0}, max_steps=400, lr=1e-3, checkpoint_every=5, log_every=5)
"""


def test_killed_distillation_resumes_from_its_checkpoint(llama4_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(llama4_dir), str(folder)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while checkpoint_step(folder) < 10:
            assert process.poll() is None, process.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint of step 10 appeared"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    killed_at = checkpoint_step(folder)
    assert 10 <= killed_at < 400  # killed in the middle of training

    loaded = load_compressed(llama4_dir)
    report = distill(loaded.model, llama4_dir, batches(loaded.tokenizer, 128, seed=13), folder,
                     losses={"logits": 1.0}, max_steps=killed_at + 10, lr=1e-3,
                     checkpoint_every=5, log_every=5)
    # it continued: the budget counts the steps before the kill, the curve has no restart
    assert report.metrics["resumed_from_step"] == killed_at
    assert report.metrics["steps"] == killed_at + 10
    steps = [step for step, _ in report.curves["loss"]]
    assert steps == list(range(5, killed_at + 11, 5))


def checkpoint_step(folder: Path) -> int:
    path = folder / "checkpoint.pt"
    if not path.exists():
        return -1
    return int(torch.load(path, weights_only=True)["state"]["step"])


def test_resumed_run_ends_where_an_uninterrupted_run_ends(llama4_dir: Path, tmp_path: Path) -> None:
    """Optimizer, schedule, data order and RNG all continue: the same weights either way."""
    options = {"losses": {"logits": 1.0, "hidden": 1.0}, "max_steps": 12, "lr": 1e-3,
               "schedule": "constant", "checkpoint_every": 4, "log_every": 4, "warmup_steps": 2}
    loaded = load_compressed(llama4_dir)
    training = batches(loaded.tokenizer, 64, seed=13)
    whole = copy.deepcopy(loaded.model)
    distill(whole, llama4_dir, training, tmp_path / "whole", **options)

    # stopped after 8 steps (its budget ended there: the checkpoint of step 8 is left),
    # then continued under the full budget from the same folder
    first = copy.deepcopy(loaded.model)
    distill(first, llama4_dir, training, tmp_path / "resumed", **{**options, "max_steps": 8})
    resumed = copy.deepcopy(loaded.model)
    report = distill(resumed, llama4_dir, training, tmp_path / "resumed", **options)
    assert report.metrics["resumed_from_step"] == 8
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(llama4_dir: Path, tmp_path: Path) -> None:
    loaded = load_compressed(llama4_dir)
    student = loaded.model
    calls = {"n": 0}

    def poison(_module, _args, output):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 8 else output  # the 8th training step

    handle = find_blocks(student)[1][0].register_forward_hook(poison)
    report = distill(student, llama4_dir, batches(loaded.tokenizer, 64, seed=13), tmp_path / "ckpt",
                     max_steps=50, lr=1e-3, checkpoint_every=5, log_every=3)
    handle.remove()
    assert report.metrics["nan_step"] == 8
    assert report.metrics["steps"] == 5  # the last good checkpoint
    saved = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)
    assert saved["state"]["step"] == 5
    for name, value in student.state_dict().items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, saved["student"][name], msg=name)
    assert [s for s, _ in report.curves["loss"]] == [3]  # as saved with the step-5 checkpoint


def test_mismatched_teacher_and_student_fail_before_training(
    llama4_dir: Path, bert4_dir: Path, tmp_path: Path
) -> None:
    loaded = load_compressed(llama4_dir)
    training = batches(loaded.tokenizer, 16, seed=13)

    other_vocab = copy.deepcopy(loaded.model.config)
    other_vocab.vocab_size += 10
    with pytest.raises(ValueError, match=r"teacher .*llama4 \(llama, 4 blocks.*vocabulary \d+\) and "
                                         r"student \(llama, 4 blocks.*different vocabularies"):
        distill(LlamaForCausalLM(other_vocab), llama4_dir, training, tmp_path / "a")

    narrow = LlamaForCausalLM(LlamaConfig(**{**loaded.model.config.to_dict(), "hidden_size": 32,
                                             "head_dim": 8}))
    with pytest.raises(ValueError, match=r"hidden 64.*student .*hidden 32.* different hidden sizes"):
        distill(narrow, llama4_dir, training, tmp_path / "b")
    # with a learned projection the same pair trains
    report = distill(narrow, llama4_dir, training, tmp_path / "c", project=True, max_steps=3)
    assert report.metrics["steps"] == 3

    with pytest.raises(ValueError, match=r"layer_map: teacher block 7 does not exist: teacher"):
        distill(copy.deepcopy(loaded.model), llama4_dir, training, tmp_path / "d",
                layer_map={0: 7})
    with pytest.raises(ValueError, match=r"layer_map: student block 5 does not exist"):
        distill(copy.deepcopy(loaded.model), llama4_dir, training, tmp_path / "e",
                layer_map={5: 0})
    bert = load_compressed(bert4_dir).model
    with pytest.raises(ValueError, match="one is a causal-lm, the other a encoder"):
        distill(bert, llama4_dir, training, tmp_path / "f")
    for folder in "abdef":  # nothing trained: no checkpoint was written
        assert not (tmp_path / folder / "checkpoint.pt").exists()


def test_train_subset_changes_only_norms_and_biases(llama4_dir: Path, tmp_path: Path) -> None:
    loaded = load_compressed(llama4_dir)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    report = distill(loaded.model, llama4_dir, batches(loaded.tokenizer, 32, seed=13),
                     tmp_path / "ckpt", train="norms_biases", max_steps=5, lr=1e-2)
    changed = {k for k, v in loaded.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("norm" in name for name in changed)  # Llama has no biases
    assert report.metrics["trainable_parameters"] == 64 * (2 * 4 + 1)
    assert all(p.requires_grad for p in loaded.model.parameters())  # restored afterwards


def test_pruned_weights_stay_pruned_through_training(llama4_dir: Path, tmp_path: Path) -> None:
    loaded = load_compressed(llama4_dir)
    student = loaded.model
    run_stage_steps(student, [CATALOG.build(CATALOG.parse({"kind": "magnitude", "sparsity": 0.5}))])
    pruned = {name: m.weight == 0 for name, m in student.named_modules()
              if isinstance(m, torch.nn.Linear) and "lm_head" not in name}
    before = {name: student.get_submodule(name).weight.clone() for name in pruned}
    distill(student, llama4_dir, batches(loaded.tokenizer, 32, seed=13), tmp_path / "ckpt",
            max_steps=5, lr=1e-2)
    for name, zeros in pruned.items():
        weight = student.get_submodule(name).weight
        assert float(zeros.float().mean()) == pytest.approx(0.5, abs=0.01), name
        assert torch.equal(weight == 0, zeros), name  # the same zeros, no new ones
        assert not torch.equal(weight, before[name]), name  # the kept weights trained


def test_distill_config_errors_name_the_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown key 'temprature'"):
        CATALOG.parse({"kind": "distill", "temprature": 2})
    with pytest.raises(ValidationError, match="patience: early stopping needs eval_every"):
        CATALOG.parse({"kind": "distill", "patience": 2})
    with pytest.raises(ValidationError, match="every loss weight is 0"):
        CATALOG.parse({"kind": "distill", "losses": {"logits": 0}})
    with pytest.raises(ValidationError, match="give either keep or keep_every"):
        CATALOG.parse({"kind": "student", "keep": [0], "keep_every": 2})
