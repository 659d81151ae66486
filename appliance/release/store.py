"""The device's model store, ``<state dir>/models``: model files under ``<sha256 prefix>-<name>``, shared by the
releases that ship them.

The store is root's, but it lies inside the service's state directory, which the service's account owns and could
rearrange. So the store is opened by descriptor and must belong to root alone (a directory swapped in by someone
else is refused); files are copied in under a random name with O_EXCL|O_NOFOLLOW, flushed, checked against their
digest and renamed into place; nothing in it is followed if it is a link (safefs.py).
"""

from __future__ import annotations

import stat
from pathlib import Path

from .safefs import Directory
from .verify import BundleError


class ModelStore:
    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        with Directory(path.parent, create=create, mode=0o755) as parent:
            self.dir = parent.subdir(path.name, create=create, mode=0o755, own=True)

    @classmethod
    def open_existing(cls, path: Path) -> ModelStore | None:
        try:
            return cls(path)
        except FileNotFoundError:
            return None

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.dir.close()

    def holds(self, name: str, size: int | None = None) -> bool:
        """Whether the store has ``name`` as a plain file (of ``size`` bytes, when given)."""
        st = self.dir.lstat(name)
        return st is not None and stat.S_ISREG(st.st_mode) and size in (None, st.st_size)

    def sha256(self, name: str) -> str | None:
        return self.dir.sha256(name)

    def add(self, source: Path, name: str, digest: str) -> None:
        """Copy a model file in; refused (and nothing left behind) when the copy does not match its digest."""
        if self.dir.copy_in(source, name, mode=0o644) != digest:  # a bad SD card or a full disk shows here
            self.dir.unlink(name)
            raise BundleError(f"{self.path / name}: the copy does not match the bundle's sha256")

    def prune(self, keep: set[str]) -> list[Path]:
        """Remove files no kept release links to, and copies a power cut left half-done."""
        removed = []
        for name in self.dir.names():
            st = self.dir.lstat(name)
            if st is None or stat.S_ISDIR(st.st_mode) or name in keep:
                continue
            self.dir.unlink(name)
            removed.append(self.path / name)
        return removed
