"""What this machine's matrix units do well, to choose a dtype for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidOptionError

# CPU flags (as Linux names them) that give fast bfloat16 matrix products.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    reason: str


def _cpuinfo_field(name: str, cpuinfo: str | None) -> str | None:
    """First value of a field of /proc/cpuinfo (None where the field or the file does not exist)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
    return set((_cpuinfo_field("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: str | None = None) -> str:
    return _cpuinfo_field("model name", cpuinfo) or "unknown CPU"


def auto_dtype(device: torch.device = torch.device("cpu"), flags: set[str] | None = None) -> DtypeChoice:
    """bfloat16 where the matrix units multiply it fast, float32 elsewhere."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "the GPU multiplies bfloat16 fast")
        return DtypeChoice("float32", "the GPU has no bfloat16")
    flags = cpu_flags() if flags is None else flags
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if found and torch.backends.mkldnn.is_available():
        return DtypeChoice("bfloat16", f"the CPU has {found[0]}")
    return DtypeChoice("float32", "the CPU has no bfloat16 matrix instructions (amx_bf16, avx512_bf16)")


def machine_info(device: torch.device = torch.device("cpu")) -> dict:
    """What a benchmark result depends on: CPU, cores, threads, the GPU if one runs the model,
    and library versions."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("tokenrecycle", "torch", "transformers", "numpy", "llama-cpp-python"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {
        "cpu": cpu_model(),
        "cpu_flags": sorted(cpu_flags()),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def choose_dtype(asked: str, device: torch.device = torch.device("cpu")) -> DtypeChoice:
    """The dtype for a setting of auto, float32 or bfloat16 on a device, with the reason."""
    from .models import DTYPES  # models loads transformers: not needed for the CPU checks above

    if asked == "auto":
        picked = auto_dtype(device)
        return DtypeChoice(picked.dtype, f"auto: {picked.reason}")
    if asked not in DTYPES:
        raise InvalidOptionError(f"dtype must be auto or one of {', '.join(DTYPES)}, got '{asked}'")
    return DtypeChoice(asked, f"asked for {asked}")
