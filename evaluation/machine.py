"""What a speed measurement ran on: the CPU, its vector capability and the torch build.

Speed-ups differ a lot between CPUs (an AVX2-only EPYC runs bf16 GEMMs 6x slower than
fp32, an AMX Xeon 2-4x faster), so every measured speed is recorded beside these.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")  # Linux only; elsewhere the other sources answer


def machine_tags() -> dict[str, str]:
    """{"cpu_capability", "cpu_model", "torch_version", "threads"} as strings."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512
        "cpu_model": cpu_model(),
        "torch_version": torch.__version__,
        "threads": str(torch.get_num_threads()),
    }


def cpu_model() -> str:
    """The CPU's model name: torch's cpuinfo, else /proc/cpuinfo, else the platform's
    processor string, else "unknown"; never raises."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # x86 builds of torch >= 2.8
    if capabilities is not None:
        try:
            name = capabilities().get("cpu_name")
        except (RuntimeError, AttributeError) as error:  # not built with cpuinfo here
            log.debug("torch.cpu.get_capabilities failed: %s", error)
            name = None
        if name:
            return str(name).strip()
    try:
        for line in CPUINFO.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:  # no /proc (macOS, Windows) or not readable
        pass
    return platform.processor().strip() or "unknown"
