"""Peak memory: a packed model must not materialize its dense weights on load; each meter
(/proc on Linux, getrusage elsewhere) reads a known allocation; no meter means a recorded
reason, not a crash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from squeezeflow import sampledata
from squeezeflow.compression.artifact import save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.evaluation import memory
from squeezeflow.evaluation.memory import (
    MEMORY_SKIPPED_TAG,
    MemoryUnavailable,
    maxrss_mb,
    measure_peak_memory,
    memory_method,
    memory_metrics,
    peak_memory_mb,
)
from squeezeflow.testing import save_model, tiny_llama


def test_packed_int8_model_peaks_below_its_dense_base(tmp_path: Path) -> None:
    # Block Linears dominate (4 x 7.1M of 29M parameters): fp32 ~113 MB, int8 ~28 MB.
    config = LlamaConfig(vocab_size=512, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=12,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    _, tokenizer = tiny_llama()
    base = save_model(model, tokenizer, tmp_path / "base")
    run_stage_steps(model, [CATALOG.build(CATALOG.parse({"kind": "rtn", "bits": 8}))], [])
    packed = save_compressed(model, tokenizer, "causal-lm", tmp_path / "int8")
    texts = sampledata.sentences(4, seed=5)
    base_mb = peak_memory_mb(base, texts, batch_size=4, max_length=32)
    packed_mb = peak_memory_mb(packed, texts, batch_size=4, max_length=32)
    # fp32 -> int8 saves ~85 MB of weights; materializing the dense weights on load
    # would cost them back (packed >= base). Measured: base 140.7 MB, int8 69.9 MB here;
    # 158.3 / 96.9 MB in a fresh CI clone (a constant overhead on both).
    assert base_mb > 100
    assert base_mb - packed_mb > 40


# --- where the operating system allows: the meters, the fallback and the skip ------------

ALLOCATION_MB = 128  # well above the interpreter's own noise (a few MB)

# A child that allocates a known amount after taking its baseline: bytes written, so the
# pages are resident (a zeroed bytearray may stay unmapped).
ALLOCATING_CHILD = f"""
import sys
from squeezeflow.evaluation.memory import PeakMeter, start_fresh_peak_count
method = sys.argv[1]
start_fresh_peak_count(method)
meter = PeakMeter(method)
meter.start()
data = b"\\x01" * ({ALLOCATION_MB} * 2**20)
print(meter.peak_mb())
"""


def meter_available(method: str) -> bool:
    if method == "proc":
        return memory.PROC_STATUS.is_file() and os.access(memory.PROC_CLEAR_REFS, os.W_OK)
    return memory._resource_module() is not None


@pytest.mark.parametrize("method", ["proc", "rusage"])
def test_each_meter_reads_an_allocation_of_known_size_from_a_large_parent(method: str) -> None:
    if not meter_available(method):
        pytest.skip(f"no {method} meter on {sys.platform}")
    # A parent larger than the child's whole peak: ru_maxrss survives exec, so without the
    # fork the child would start at this size and read ~0 for its allocation.
    ballast = b"\x01" * (3 * ALLOCATION_MB * 2**20)
    result = subprocess.run([sys.executable, "-c", ALLOCATING_CHILD, method],
                            capture_output=True, text=True, check=False, timeout=120)
    del ballast
    assert result.returncode == 0, result.stderr[-2000:]
    peak = float(result.stdout.strip().splitlines()[-1])
    # 8 MB: the interpreter's own growth while building the bytes object
    assert 0.95 * ALLOCATION_MB < peak < ALLOCATION_MB + 8


def test_ru_maxrss_is_bytes_on_macos_and_kib_on_linux() -> None:
    assert maxrss_mb(300 * 1024, "linux") == pytest.approx(300.0)
    assert maxrss_mb(300 * 2**20, "darwin") == pytest.approx(300.0)


def no_proc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(memory, "PROC_STATUS", tmp_path / "no-proc" / "status")
    monkeypatch.setattr(memory, "PROC_CLEAR_REFS", tmp_path / "no-proc" / "clear_refs")


def test_without_proc_the_rusage_meter_is_chosen(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    if memory._resource_module() is None:
        pytest.skip(f"no resource module on {sys.platform}")
    no_proc(monkeypatch, tmp_path)
    method, why = memory_method()
    assert method == "rusage" and why.startswith("no /proc")
    launched: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        launched.append(command)
        return subprocess.CompletedProcess(command, 0, stdout='{"peak_memory_mb": 12.5}\n')

    monkeypatch.setattr(memory.subprocess, "run", run)
    measured = measure_peak_memory(tmp_path, ["a text"], 1, 8)
    assert measured.method == "rusage" and measured.peak_mb == 12.5
    # kernels decided in a first process, measured in a second, both told the meter
    assert [command[3] for command in launched] == ["rusage", "rusage"]


def test_without_proc_or_resource_memory_is_skipped_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_proc(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` fails, as on Windows

    def run(*args: object, **kwargs: object) -> None:
        raise AssertionError("no measurement process may start")

    monkeypatch.setattr(memory.subprocess, "run", run)
    assert memory_method()[0] is None
    metrics, tags = memory_metrics(tmp_path, tmp_path, ["a text"], 1, 8)
    assert metrics == {}
    assert sys.platform in tags[MEMORY_SKIPPED_TAG] and "resource" in tags[MEMORY_SKIPPED_TAG]
    with pytest.raises(MemoryUnavailable, match="no peak-memory reading"):
        peak_memory_mb(tmp_path, ["a text"], 1, 8)
