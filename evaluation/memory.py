"""Peak memory of loading a model folder and running one batch, in a fresh process.

A fresh process is the honest measurement on CPU: after the imports the kernel's
peak resident set size (VmHWM) is reset to the current size (`/proc/self/clear_refs`),
and the peak after loading the model and running one inference batch, minus the
size at reset, is what the model costs. The first batch of a packed model on a machine
decides its kernels (timing candidates: a once-per-machine cost, cached on disk), so a
first process runs the batch unmeasured to make those decisions, and a second process,
which finds them cached, is measured.
Run as `python -m squeezeflow.evaluation.memory MODEL_DIR TEXTS_JSON BATCH MAX_LEN`.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024.0  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> float:
    """Reset the peak RSS to the current RSS; returns the current RSS in MB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak RSS (Linux >= 4.0)
    return _status_mb("VmRSS")


def peak_memory_mb(model_dir: Path, texts: list[str], batch_size: int, max_length: int) -> float:
    """Peak MB above the post-import baseline for load + one batch of `texts`."""
    texts_json = json.dumps(texts[:batch_size])
    for _ in ("decide kernels", "measure"):
        result = subprocess.run(
            [sys.executable, "-m", __name__, str(model_dir), texts_json, str(max_length)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"memory measurement of {model_dir} failed:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_memory_mb"])


def _measure(model_dir: str, texts_json: str, max_length: int) -> float:
    import torch

    from squeezeflow.compression.artifact import load_compressed
    from squeezeflow.compression.models import mean_pooled_embeddings

    _import_model_code(model_dir)  # code is not the model: import it before the baseline
    baseline = _reset_peak()
    loaded = load_compressed(model_dir, runtime="packed")  # what a user runs
    batch = loaded.tokenizer(
        json.loads(texts_json),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    with torch.inference_mode():
        if loaded.kind == "encoder":
            mean_pooled_embeddings(loaded.model, batch["input_ids"], batch["attention_mask"])
        else:
            loaded.model(**batch, use_cache=False)
    return _status_mb("VmHWM") - baseline


def _import_model_code(model_dir: str) -> None:
    """Import the modeling module of the folder's architecture: transformers imports it
    lazily, at first use, and its code is not the model's memory."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(model_dir)
    try:
        MODEL_MAPPING[type(config)]
    except KeyError:  # an architecture transformers does not map: measured as it comes
        pass


if __name__ == "__main__":
    model_path, texts_arg, length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps({"peak_memory_mb": _measure(model_path, texts_arg, length)}))
