"""Measured kernel choice: which kernel runs a packed layer is timed, not assumed.

A packed layer offers several `Kernel`s for its product (packed aten ops with bf16
or fp32 activations, a dense GEMM on the weight dequantized per call, ...). On first
use for a (format, shape, rows bucket) the chooser

1. checks each kernel against the layer's accuracy contract on probe inputs (a
   kernel that errs, e.g. an int8 GEMM that saturates on a CPU without VNNI, is
   dropped with its measured error as the reason);
2. times the survivors side by side (interleaved repeats, median);
3. keeps the fastest, and writes the decision to a JSON file keyed by this
   machine's CPU model and flags, the torch version and the thread count, so each
   machine pays for a decision once.

CPUs differ too much for a fixed choice (measured: a bf16 GEMM 6x slower than fp32
on an AVX2-only EPYC, 2-4x faster on an AMX Xeon). The dense product is always a
candidate, so a kernel choice never makes a layer slower than its dense base.

Environment: `SQUEEZEFLOW_KERNEL_CACHE` = the decisions file (default
`~/.cache/squeezeflow/kernels-<fingerprint>.json`); `SQUEEZEFLOW_KERNEL_CHOICE=first`
skips timing and takes the first kernel that meets the contract (deterministic, for
tests that do not measure speed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Rows per call are bucketed; each bucket is decided once, timed at its upper bound.
ROW_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)
EXACT_TOLERANCE = 1e-4  # integer kernels against their own exact product: only fp32 epilogues differ
MIN_REPEATS = 3  # a median of three already ignores one descheduled call
MAX_REPEATS = 15
TIME_BUDGET_S = 0.3  # per candidate and decision: enough repeats for a stable median
PROBE_SEED = 1234
TIE = 0.05  # timings closer than this are noise on a shared 2-core machine
HOPELESS = 3.0  # a first timed call this many times the best one's is not repeated
SCREEN_ROWS = 64  # larger batches are screened on this many rows first


@dataclass(frozen=True)
class Kernel:
    """One way to compute a packed layer's product.

    run: x (rows, in) fp32 -> y (rows, out) fp32, without the bias (the layer adds it).
    exact: the product this kernel must reproduce to `EXACT_TOLERANCE`, when it is
    not the layer's reference (W8A8 kernels compute an int8 product, which the
    reference only approximates); None = the layer's reference within its tolerance.
    """

    name: str
    run: Callable[[Tensor], Tensor]
    exact: Callable[[Tensor], Tensor] | None = None


@dataclass
class Decision:
    kernel: str
    ms: dict[str, float] = field(default_factory=dict)  # time per call of each kept candidate
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> reason

    def as_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "ms": self.ms, "rejected": self.rejected}


def row_bucket(rows: int) -> int:
    """The smallest bucket holding `rows` (the last bucket holds everything above)."""
    for bucket in ROW_BUCKETS:
        if rows <= bucket:
            return bucket
    return ROW_BUCKETS[-1]


def cpu_fingerprint() -> dict[str, Any]:
    """What a decision depends on: CPU model and flags, torch build, dispatch level, threads."""
    capabilities: dict[str, Any] = {}
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        try:
            capabilities = dict(get_capabilities())
        except RuntimeError:  # builds without cpuinfo
            capabilities = {}
    flags = sorted(name for name, value in capabilities.items() if value is True)
    return {
        "cpu": str(capabilities.get("cpu_name") or platform.processor() or platform.machine()),
        "flags": flags,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def cache_path() -> Path:
    configured = os.environ.get("SQUEEZEFLOW_KERNEL_CACHE")
    if configured:
        return Path(configured).expanduser()
    digest = hashlib.sha256(json.dumps(cpu_fingerprint(), sort_keys=True).encode()).hexdigest()
    return Path.home() / ".cache" / "squeezeflow" / f"kernels-{digest[:16]}.json"


class KernelChooser:
    """Decisions per key, kept in memory and in a JSON file shared by processes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._decisions: dict[str, Decision] | None = None
        self._lock = threading.Lock()

    @property
    def file(self) -> Path:
        return self.path if self.path is not None else cache_path()

    def decisions(self) -> dict[str, Decision]:
        if self._decisions is None:
            self._decisions = self._read()
        return self._decisions

    def choose(
        self, key: str, kernels: Sequence[Kernel], reference: Callable[[Tensor], Tensor],
        tolerance: float, probe_rows: int, in_features: int, device: str = "cpu",
    ) -> Decision:
        """The fastest kernel that meets the contract for `key`, decided once."""
        with self._lock:
            known = self.decisions().get(key)
            names = {kernel.name for kernel in kernels}
            if known is not None and known.kernel in names:
                return known
            decision = decide(kernels, reference, tolerance, probe_rows, in_features, device)
            self.decisions()[key] = decision
            self._write(key, decision)
        log.info(
            "kernel for %s: %s (%s)%s", key, decision.kernel,
            ", ".join(f"{name} {ms:.3f} ms" for name, ms in decision.ms.items()),
            "".join(f"; {name} rejected: {why}" for name, why in decision.rejected.items()),
        )
        return decision

    def _read(self) -> dict[str, Decision]:
        try:
            raw = json.loads(self.file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("kernel decisions in %s unreadable (%s); deciding again", self.file, error)
            return {}
        entries = raw.get("decisions", {}) if isinstance(raw, dict) else {}
        return {
            key: Decision(value["kernel"], dict(value.get("ms", {})), dict(value.get("rejected", {})))
            for key, value in entries.items()
            if isinstance(value, dict) and isinstance(value.get("kernel"), str)
        }

    def _write(self, key: str, decision: Decision) -> None:
        """Merge one decision into the file (others' decisions kept); atomic rename."""
        if os.environ.get("SQUEEZEFLOW_KERNEL_CHOICE") == "first":
            return  # untimed choices are not measurements: never persist them
        target = self.file
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            merged = {k: v.as_json() for k, v in self._read().items()}
            merged[key] = decision.as_json()
            content = {"fingerprint": cpu_fingerprint(), "decisions": merged}
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".kernels-", suffix=".tmp")
            with os.fdopen(handle, "w") as stream:
                json.dump(content, stream, indent=1, sort_keys=True)
            os.replace(temporary, target)
        except OSError as error:  # a read-only home must not stop a model from running
            log.warning("could not save kernel decisions to %s: %s", target, error)


def probe_inputs(rows: int, in_features: int, adversarial: bool, device: str = "cpu") -> Tensor:
    """Inputs (rows, in) fp32 the contract is checked on.

    Plain: Gaussian rows, what the tolerance against the reference is judged on.
    Adversarial: one outlier channel (as in transformer activations), rows of constant
    magnitude that put every int8 activation at +-127, and one all-positive row (every
    byte of a u8-shifted activation at 255): the worst case for int8 GEMMs that
    accumulate pairs in 16 bits (oneDNN and fbgemm on CPUs without VNNI saturate there).
    """
    generator = torch.Generator().manual_seed(PROBE_SEED)
    count = max(rows, 4)
    x = torch.randn(count, in_features, generator=generator)
    if adversarial:
        x[:, 0] *= 30
        x[count // 2:] = x[count // 2:].sign()
        x[0] = 1.0
    return x[:rows].to(device)


def relative_error(y: Tensor, reference: Tensor) -> float:
    y64, ref64 = y.to(torch.float64), reference.to(torch.float64)
    return float((y64 - ref64).norm() / ref64.norm().clamp(min=1e-30))


def contract_rejections(
    kernels: Sequence[Kernel], reference: Callable[[Tensor], Tensor], tolerance: float,
    rows: int, in_features: int, device: str = "cpu",
) -> dict[str, str]:
    """Why each kernel that fails the contract is rejected (kernels that pass are absent).

    Every kernel must stay within `tolerance` of the reference on plain inputs; a kernel
    with its own exact product must also reproduce it on adversarial inputs.
    """
    plain = probe_inputs(rows, in_features, adversarial=False, device=device)
    adversarial = probe_inputs(rows, in_features, adversarial=True, device=device)
    expected = reference(plain)
    rejected: dict[str, str] = {}
    for kernel in kernels:
        try:
            with torch.inference_mode():
                y, y_adversarial = kernel.run(plain), kernel.run(adversarial)
        except (RuntimeError, NotImplementedError, ValueError) as failure:
            rejected[kernel.name] = f"failed: {str(failure).splitlines()[0][:200]}"
            continue
        if not bool(torch.isfinite(y).all() and torch.isfinite(y_adversarial).all()):
            rejected[kernel.name] = "non-finite output"
            continue
        error = relative_error(y, expected)
        if error > tolerance:
            rejected[kernel.name] = f"relative error {error:.3g} > contract {tolerance:g}"
            continue
        target = kernel.exact if kernel.exact is not None else reference
        limit = EXACT_TOLERANCE if kernel.exact is not None else tolerance
        error = relative_error(y_adversarial, target(adversarial))
        if error > limit:
            what = "its exact product" if kernel.exact is not None else "the reference"
            rejected[kernel.name] = (
                f"relative error {error:.3g} against {what} on adversarial inputs > {limit:g}"
            )
    return rejected


def decide(
    kernels: Sequence[Kernel], reference: Callable[[Tensor], Tensor], tolerance: float,
    probe_rows: int, in_features: int, device: str = "cpu",
) -> Decision:
    """Check every kernel against the contract, time the survivors, keep the fastest.

    `kernels` come in order of preference (most accurate first): a kernel within
    `TIE` of the fastest wins over a later one, so timing noise never trades accuracy
    for nothing.
    """
    if not kernels:
        raise ValueError("no kernel to choose from")
    rejected = contract_rejections(
        kernels, reference, tolerance, min(probe_rows, 64), in_features, device
    )
    kept = [kernel for kernel in kernels if kernel.name not in rejected]
    if not kept:
        reasons = "; ".join(f"{name}: {why}" for name, why in rejected.items())
        raise RuntimeError(f"no kernel meets the accuracy contract ({reasons})")
    if len(kept) == 1 or os.environ.get("SQUEEZEFLOW_KERNEL_CHOICE") == "first":
        return Decision(kept[0].name, {}, rejected)
    ms = time_kernels(kept, probe_inputs(probe_rows, in_features, adversarial=False, device=device))
    fastest = min(ms.values())  # kernels screened out are not in `ms`
    best = next(k.name for k in kept if ms.get(k.name, float("inf")) <= fastest * (1 + TIE))
    return Decision(best, ms, rejected)


def time_kernels(kernels: Sequence[Kernel], x: Tensor) -> dict[str, float]:
    """Median ms per call of each kernel on `x`, timed round-robin after a warm-up.

    A kernel whose first timed call takes over `HOPELESS` times the best first call is
    not repeated (its one call is reported): it cannot win, and at large batches such
    calls take seconds (measured: int8 with fp32 activations, 27 s at 1024 x 4096 ->
    11008 against 0.4 s for the winner).
    """
    def once(kernel: Kernel) -> float:
        start = time.perf_counter()
        kernel.run(x)
        _synchronize(x)
        return time.perf_counter() - start

    kernels = screened(kernels, x, once)
    with torch.inference_mode():
        for kernel in kernels:  # warm-up: first calls allocate, compile, pack
            once(kernel)
        first = {kernel.name: once(kernel) for kernel in kernels}
        best = min(first.values())
        contenders = [kernel for kernel in kernels if first[kernel.name] <= HOPELESS * best]
        slowest = max(first[kernel.name] for kernel in contenders)
        repeats = max(MIN_REPEATS, min(MAX_REPEATS, int(TIME_BUDGET_S / max(slowest, 1e-6))))
        times = {kernel.name: [first[kernel.name]] for kernel in contenders}
        for _ in range(repeats - 1):
            for kernel in contenders:
                times[kernel.name].append(once(kernel))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {kernel.name: 1e3 * medians.get(kernel.name, first[kernel.name]) for kernel in kernels}


def screened(
    kernels: Sequence[Kernel], x: Tensor, once: Callable[[Kernel], float]
) -> list[Kernel]:
    """Kernels worth timing on all of x's rows, judged on its first `SCREEN_ROWS` rows.

    A call on more rows never takes less time, and a call on n times more rows takes
    at most about n times longer; so a kernel slower on the few rows than HOPELESS
    times the best kernel's time scaled up to all rows cannot win (measured: oneDNN's
    int8 linear at 4096 x 1536 -> 384 took 34 s per call on a Zen 4 EPYC, `_int_mm`
    25 ms; screening costs one call on 64 rows).
    """
    rows = x.shape[0]
    if rows <= SCREEN_ROWS:
        return list(kernels)
    few = x[:SCREEN_ROWS]
    small = [Kernel(k.name, (lambda run: lambda _: run(few))(k.run), k.exact) for k in kernels]
    with torch.inference_mode():
        for kernel in small:
            kernel.run(few)  # warm-up: compile, allocate
        seconds = {kernel.name: once(kernel) for kernel in small}
    scale = rows / SCREEN_ROWS
    bound = HOPELESS * min(value * scale for value in seconds.values())
    return [kernel for kernel in kernels if seconds[kernel.name] <= bound]


def _synchronize(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def default_chooser() -> KernelChooser:
    """The chooser packed layers use; its file follows `SQUEEZEFLOW_KERNEL_CACHE`."""
    return _chooser_for(cache_path())


@functools.cache
def _chooser_for(path: Path) -> KernelChooser:
    return KernelChooser(path)
