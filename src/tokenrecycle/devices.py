"""Which device a model runs on: the one owner of `--device auto|cpu|cuda[:N]`.

Everything that depends on the device asks the resolved `torch.device`, never a string: the
model, its KV caches, masks and rotary tables live there, and CPU-only features (oneDNN
prepacking, float32 attention, the C++ decoder loop) are chosen by `device.type`.
"""

from __future__ import annotations

import re

import torch

from .errors import InvalidOptionError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # as the CLI lists them
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto` (CUDA where torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`, checked
    against this machine: a GPU that is not there fails here, in one line, before anything loads."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(spec)
    if match is None:
        raise InvalidOptionError(f"device must be auto, cpu, cuda or cuda:N, got '{spec}'")
    if not torch.cuda.is_available():
        raise InvalidOptionError(f"device {spec}: this torch sees no CUDA GPU ({_why_no_cuda()})")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise InvalidOptionError(f"device {spec}: this machine has {count} CUDA device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return "no GPU or driver found"


def device_name(device: torch.device) -> str:
    """What a measurement on this device depends on: the CPU's model, or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .hardware import cpu_model

    return cpu_model()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_buffer(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host tensor to stage a step's inputs in: page-locked where the device is a GPU, so its
    copy to the device is one asynchronous transfer."""
    return torch.empty(size, dtype=dtype, pin_memory=device.type == "cuda")
