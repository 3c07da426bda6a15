"""GGUFs shipped in several data-only packages (a package index caps a wheel's size): found
without importing the packages, joined once into the cache and verified before anyone reads them."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptModelError, ModelNotFoundError
from .files import atomic_write

CHUNK = 8 << 20  # bytes copied (and hashed) at a time


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF as parts: (module, package, file inside the module) each, to join in order."""

    file_name: str
    parts: tuple[tuple[str, str, str], ...]
    size: int
    sha256: str

    def part_paths(self) -> list[Path]:
        return [package_dir(module, package) / inner for module, package, inner in self.parts]


def package_dir(module: str, package: str) -> Path:
    """Folder of an installed package, found without importing it (some import heavy plugin hosts)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"this model needs the package {package} (run make install)")
    return Path(list(spec.submodule_search_locations)[0])


def assemble(split: SplitGGUF, folder: Path) -> Path:
    """The joined file in `folder`, written the first time only. A file there has been verified:
    it only ever appears by a rename after its size and digest matched. Processes that join it at
    the same time each write a temporary file of their own; the renames replace like with like."""
    target = folder / split.file_name
    if target.is_file() and target.stat().st_size == split.size:
        return target
    parts = split.part_paths()
    missing = [str(path) for path in parts if not path.is_file()]
    if missing:
        raise ModelNotFoundError(f"{split.file_name}: missing part {missing[0]} (run make install)")
    print(f"tokenrecycle: joining {len(parts)} parts into {target} once", file=sys.stderr)
    with atomic_write(target) as out:  # removed, never renamed, if the check below fails
        digest, size = _copy(parts, out)
        if size != split.size or digest != split.sha256:
            raise CorruptModelError(
                f"{split.file_name}: the joined parts are {size} bytes with sha256 {digest[:12]}..., "
                f"expected {split.size} bytes with sha256 {split.sha256[:12]}... (reinstall the parts)"
            )
    return target


def _copy(parts: list[Path], out) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for path in parts:
        with path.open("rb") as part:
            while block := part.read(CHUNK):
                digest.update(block)
                out.write(block)
                size += len(block)
    return digest.hexdigest(), size
