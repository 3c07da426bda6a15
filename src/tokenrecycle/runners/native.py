"""The fast runner's decoder layers as one C++ call (csrc/decoder.cpp), compiled on first use.

The C++ loop runs the same ATen operations as FastRunner's Python loop, in the same order, so
the two give bit-identical results; it saves the Python between operations (a few ms of every step
on a small model). torch's extension builder compiles it once per torch version into its cache
(about 30 s); where there is no compiler the fast runner keeps its Python loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "decoder.cpp"
SOURCES = (SOURCE, CSRC / "qmatmul.cpp", CSRC / "fused.cpp")  # compiled; the digest covers every file in csrc
SWITCH = "TOKENRECYCLE_NATIVE"  # 0: always the Python loop
# -fopenmp: at::parallel_for is a header template that splits work over threads only where the
# code using it is compiled with OpenMP (without it, the quantised kernel ran on one core). The
# library it links, libgomp.so.1, is the copy torch has already loaded, so there is one thread pool.
FLAGS = ("-O2", "-fopenmp")

# Linear kinds and activations as decoder.cpp numbers them.
PLAIN, PREPACKED, INT4, QUANT = 0, 1, 2, 3
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}


@functools.cache
def module_name() -> str:
    """The build's name carries a digest of its source and flags: checkouts of other versions on the same
    machine (a second clone, a worktree, a replica's copy) each get their own build in torch's
    cache instead of loading, or rebuilding over, one another's."""
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"tokenrecycle_decoder_{digest.hexdigest()[:12]}"


def native_wanted() -> bool:
    return os.environ.get(SWITCH, "1") != "0"


def put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the PyPI package (a dependency) keeps one beside
    this Python, which is not on PATH when the venv is not activated."""
    try:
        import ninja
    except ImportError:  # a system ninja may still be there
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(filter(None, (ninja.BIN_DIR, path)))


@functools.cache
def native_module():
    """The compiled extension, or the reason it is unavailable (a string): built at most once per
    process, and by torch's builder at most once per machine and torch version."""
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        put_ninja_on_path()
        name = module_name()
        with build_lock(Path(_get_build_directory(name, verbose=False))):
            return load(name, [str(path) for path in SOURCES], extra_cflags=list(FLAGS), extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the Python loop computes the same
        lines = str(exc).strip().splitlines()
        return f"the C++ loop could not be built ({type(exc).__name__}: {lines[0] if lines else ''})"


@contextlib.contextmanager
def build_lock(build: Path):
    """Hold the build folder while torch builds or loads into it. torch marks a build in progress
    with a `lock` file that a killed build (a server stopped while compiling) leaves behind, and
    every later load waits on it forever. An OS lock dies with its holder, so whoever holds this
    one knows no build of ours is running and that a `lock` file there is stale."""
    build.mkdir(parents=True, exist_ok=True)
    with open(build / "tokenrecycle.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def native_module_built() -> bool:
    """Whether torch's extension cache already holds the module built from this SOURCE, so that
    native_module() loads it in a moment instead of compiling for about 30 s. Reads torch's own
    naming of the build directory (TORCH_EXTENSIONS_DIR, else its default root); if that private
    helper is gone, says True: a missing notice is better than a wrong one."""
    try:
        from torch.utils.cpp_extension import LIB_EXT, _get_build_directory

        name = module_name()
        build = Path(_get_build_directory(name, verbose=False))
    except Exception:
        return True
    library = build / f"{name}{LIB_EXT}"
    if not library.is_file():
        return False
    try:  # the same source in another checkout (another path in build.ninja) is rebuilt for this one
        return str(SOURCE) in (build / "build.ninja").read_text()
    except OSError:
        return False
