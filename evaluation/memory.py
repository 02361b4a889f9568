"""Peak memory of loading a model folder and running one batch, in a fresh process.

A fresh process is the honest measurement on CPU: after the imports a baseline is
taken, and the peak resident set size after loading the model and running one
inference batch, minus that baseline, is what the model costs. The first batch of a
packed model on a machine decides its kernels (timing candidates: a once-per-machine
cost, cached on disk), so a first process runs the batch unmeasured to make those
decisions, and a second process, which finds them cached, is measured.

How the peak is read depends on what the operating system offers (`memory_method`):

- "proc" (Linux): the kernel's peak RSS (VmHWM in /proc/self/status) is reset to the
  current RSS after the imports (`/proc/self/clear_refs`), so the figure is exactly
  the growth caused by the model.
- "rusage" (macOS, or a Linux whose /proc cannot be written): `getrusage` reports the
  peak RSS of the whole process (`ru_maxrss`; KiB on Linux, bytes on macOS) and cannot
  be reset, so the measuring process forks first (the count survives exec, not fork)
  and takes the peak after the imports as its baseline; the figure is the growth of
  the peak above it (smaller than "proc" only if the imports peaked above the
  resident size they leave behind; they do not on Linux: both read 78 MB for the same
  54 MB fp32 model).
- neither (e.g. Windows): memory is not measured; `memory_metrics` returns the reason
  as the tag `memory_skipped_reason` instead of a number, and the run goes on.

Run as `python -m squeezeflow.evaluation.memory METHOD MODEL_DIR TEXTS_JSON MAX_LEN`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

log = logging.getLogger(__name__)

Method = Literal["proc", "rusage"]
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # written to clear_refs: reset VmHWM to the current RSS (Linux >= 4.0)
MEMORY_SKIPPED_TAG = "memory_skipped_reason"


class MemoryUnavailable(RuntimeError):
    """This operating system offers no way to read a process's peak memory."""


@dataclass(frozen=True)
class MemoryMeasurement:
    """A peak in MB and how it was read, or why nothing was measured."""

    peak_mb: float | None
    method: Method | None
    skipped_reason: str | None = None


def memory_method() -> tuple[Method | None, str]:
    """The best peak-memory reading this OS offers, and why it was chosen (or why none)."""
    if PROC_STATUS.is_file() and os.access(PROC_CLEAR_REFS, os.W_OK):
        return "proc", "peak RSS (VmHWM) reset after the imports via /proc/self/clear_refs"
    if _resource_module() is not None:
        why = "no writable /proc/self/clear_refs" if PROC_STATUS.is_file() else "no /proc"
        return "rusage", f"{why}: peak RSS from getrusage (ru_maxrss), baseline after imports"
    return None, (
        f"no peak-memory reading on {sys.platform}: no /proc/self/clear_refs and no "
        f"`resource` module (getrusage)"
    )


def _resource_module() -> ModuleType | None:
    """The `resource` module (Unix only), or None where Python has none (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource


def maxrss_mb(ru_maxrss: int, platform: str) -> float:
    """`ru_maxrss` in MB: macOS reports bytes, Linux and the BSDs KiB (getrusage(2))."""
    if platform == "darwin":
        return ru_maxrss / 2**20
    return ru_maxrss / 1024.0


class PeakMeter:
    """Peak resident memory of this process above a baseline, read by `method`."""

    def __init__(self, method: Method) -> None:
        self.method = method
        self.baseline_mb = 0.0

    def start(self) -> float:
        """Take the baseline (after a garbage collection); returns it in MB."""
        gc.collect()
        if self.method == "proc":
            PROC_CLEAR_REFS.write_text(RESET_PEAK_RSS)
            self.baseline_mb = _status_mb("VmRSS")  # the peak now equals the current RSS
        else:
            self.baseline_mb = self._rusage_peak_mb()  # not resettable: the peak so far
        return self.baseline_mb

    def peak_mb(self) -> float:
        """The peak since `start`, above the baseline, in MB."""
        peak = _status_mb("VmHWM") if self.method == "proc" else self._rusage_peak_mb()
        return peak - self.baseline_mb

    @staticmethod
    def _rusage_peak_mb() -> float:
        resource = _resource_module()
        if resource is None:
            raise MemoryUnavailable(f"no `resource` module on {sys.platform}")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return maxrss_mb(int(usage.ru_maxrss), sys.platform)


def start_fresh_peak_count(method: Method) -> None:
    """For "rusage", carry on in a forked child of this process, whose count starts afresh.

    `ru_maxrss` survives exec: a process started by a large parent begins with that
    parent's peak (measured on Linux: 413 MB in a fresh child of a 413 MB process, 9 MB
    in its fork), which would hide the model's growth. Call it first, before imports
    start threads; this process only waits for the child and exits with its status.
    """
    if method != "rusage":
        return  # clear_refs resets VmHWM, whatever the parent was
    child = os.fork()
    if child == 0:
        return
    _, status = os.waitpid(child, 0)
    raise SystemExit(os.waitstatus_to_exitcode(status))


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024.0  # the kernel reports kB
    raise RuntimeError(f"{PROC_STATUS} has no {field}")


def measure_peak_memory(
    model_dir: Path, texts: list[str], batch_size: int, max_length: int
) -> MemoryMeasurement:
    """Peak MB above the post-import baseline for load + one batch of `texts`, or the
    reason it cannot be measured on this OS (no subprocess is started then)."""
    method, why = memory_method()
    if method is None:
        log.warning("peak memory not measured: %s", why)
        return MemoryMeasurement(peak_mb=None, method=None, skipped_reason=why)
    log.debug("peak memory of %s: %s", model_dir, why)
    texts_json = json.dumps(texts[:batch_size])
    for _ in ("decide kernels", "measure"):
        result = subprocess.run(
            [sys.executable, "-m", __name__, method, str(model_dir), texts_json, str(max_length)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"memory measurement of {model_dir} failed:\n{result.stderr[-2000:]}")
    peak = float(json.loads(result.stdout.strip().splitlines()[-1])["peak_memory_mb"])
    return MemoryMeasurement(peak_mb=peak, method=method)


def peak_memory_mb(model_dir: Path, texts: list[str], batch_size: int, max_length: int) -> float:
    """Like `measure_peak_memory`, as a number; MemoryUnavailable where it cannot be read."""
    measured = measure_peak_memory(model_dir, texts, batch_size, max_length)
    if measured.peak_mb is None:
        raise MemoryUnavailable(measured.skipped_reason)
    return measured.peak_mb


def memory_metrics(
    base_dir: Path, candidate_dir: Path, texts: list[str], batch_size: int, max_length: int
) -> tuple[dict[str, float], dict[str, str]]:
    """The memory suite: (metrics, tags). Metrics `base_peak_memory_mb`, `peak_memory_mb`
    and `memory_ratio` with the tag `memory_method`; where the OS offers no reading, no
    metrics and the tag `memory_skipped_reason` (a gate on them then fails as missing)."""
    method, why = memory_method()
    if method is None:
        log.warning("peak memory not measured: %s", why)
        return {}, {MEMORY_SKIPPED_TAG: why}
    base = peak_memory_mb(base_dir, texts, batch_size, max_length)
    candidate = peak_memory_mb(candidate_dir, texts, batch_size, max_length)
    metrics = {
        "base_peak_memory_mb": base,
        "peak_memory_mb": candidate,
        "memory_ratio": candidate / max(base, 1e-9),  # 1e-9: never divide by 0
    }
    return metrics, {"memory_method": method}


def _measure(method: Method, model_dir: str, texts_json: str, max_length: int) -> float:
    import torch

    from squeezeflow.compression.artifact import load_compressed
    from squeezeflow.compression.families import family

    _import_model_code(model_dir)  # code is not the model: import it before the baseline
    meter = PeakMeter(method)
    meter.start()
    loaded = load_compressed(model_dir, runtime="packed")  # what a user runs
    batch = loaded.tokenizer(
        json.loads(texts_json),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    with torch.inference_mode():
        family(loaded.kind).forward(loaded.model, batch)  # as the family's users run it
    return meter.peak_mb()


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
    method_arg, model_path, texts_arg, length = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if method_arg not in ("proc", "rusage"):
        raise SystemExit(f"unknown memory method {method_arg!r}; known: proc, rusage")
    start_fresh_peak_count(method_arg)  # type: ignore[arg-type]
    peak = _measure(method_arg, model_path, texts_arg, length)  # type: ignore[arg-type]
    print(json.dumps({"peak_memory_mb": peak, "method": method_arg}))
