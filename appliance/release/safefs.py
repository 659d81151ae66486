"""Files root writes on a device: durable across a power cut, and never through a link another account planted.

Durable: a file is written under a temporary name, flushed (fsync), renamed over the old one (rename(2) is atomic)
and its directory flushed, so a power cut leaves the old file or the new one, never half of one, and the new name
is not lost. A tree that other programs wrote (pip, cp) is flushed with one syncfs(2) before anything names it.

No planted links: the service's state directory (/var/lib/appliance) belongs to the service's account, which could
put a symbolic link where root is about to write (``models/x.partial`` -> /etc/appliance/bundle-signers). So paths
are resolved one component at a time and a link is followed only where it lies in a directory that nobody but
root (or whoever runs this) can change; in a directory someone else can change, files are created with
O_EXCL|O_NOFOLLOW under a random name and renamed into place, and read with O_NOFOLLOW.

Standard library only, like the rest of appliance/release (the device runs it as its installer).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_MAX_LINKS = 40
CHUNK = 1 << 20


class UnsafePathError(OSError):
    """A path root will not use: a link where another account could have planted it, a file that is not a plain
    file, or a directory that should be root's and is not. The message names the path and why."""


def _trusted(st: os.stat_result) -> bool:
    """Whether nobody but root or this process's own user can change what the directory holds."""
    mine = (0, os.geteuid())
    if st.st_uid not in mine or st.st_mode & stat.S_IWOTH:
        return False
    return not (st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()))


def _owner(st: os.stat_result) -> str:
    who = f"uid {st.st_uid}" if st.st_uid not in (0, os.geteuid()) else "group or others"
    return f"{who} can change it"


def open_dir(path: str | os.PathLike[str], *, create: bool = False, mode: int = 0o755) -> int:
    """A descriptor of the directory ``path``, resolved one component at a time without following a link that
    lies in a directory someone else can change (``create``: missing directories are made, ``mode``)."""
    text = os.fspath(path)
    fd = os.open("/" if text.startswith("/") else ".", _DIR)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    where = Path("/" if text.startswith("/") else ".")
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, "no such directory", str(where / name)) from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, mode, dir_fd=fd)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                holder = os.fstat(fd)
                if not _trusted(holder):
                    raise UnsafePathError(f"{where / name}: a symbolic link in a directory that "
                                          f"{_owner(holder)}; root does not follow it")
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", text)
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", _DIR)
                    where = Path("/")
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            # O_NOFOLLOW: a link swapped in since the check above fails here (ELOOP) instead of being followed
            inner = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd, where = inner, where / name
        return fd
    except BaseException:
        os.close(fd)
        raise


class Directory:
    """A directory held open by descriptor: every name in it is used relative to it, and no link is followed.

    ``own``: the directory must be root's (or this process's user's) alone, e.g. the model store inside the
    service's state directory; otherwise refused, because whoever can change it could swap files under root."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False, mode: int = 0o755,
                 own: bool = False) -> None:
        self.path = Path(path)
        self.fd = open_dir(path, create=create, mode=mode)
        if own and not _trusted(st := os.fstat(self.fd)):
            os.close(self.fd)
            raise UnsafePathError(f"{self.path}: must belong to root alone, but {_owner(st)}")

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def sync(self) -> None:
        """Flush the directory's entries (a rename or unlink in it survives a power cut)."""
        os.fsync(self.fd)

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def subdir(self, name: str, *, create: bool = False, mode: int = 0o755, own: bool = False) -> Directory:
        return _child(self, name, create=create, mode=mode, own=own)

    def open_file(self, name: str) -> BinaryIO | None:
        """A plain file of this directory, opened for reading without following a link (None when missing)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"{self.path / name}: a symbolic link; not followed") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise UnsafePathError(f"{self.path / name}: not a plain file with one name (a device, a fifo or a "
                                  f"hard link); not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def read(self, name: str, limit: int = 1 << 20) -> bytes | None:
        f = self.open_file(name)
        if f is None:
            return None
        with f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise UnsafePathError(f"{self.path / name}: larger than {limit} bytes; not read")
        return data

    def sha256(self, name: str) -> str | None:
        f = self.open_file(name)
        if f is None:
            return None
        digest = hashlib.sha256()
        with f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def write(self, name: str, data: bytes | str, *, mode: int = 0o644,
              owner: tuple[int, int] | None = None) -> None:
        """Replace ``name`` with ``data``, durably: written, flushed, renamed into place, directory flushed."""
        self._replace(name, lambda f: f.write(data.encode() if isinstance(data, str) else data), mode, owner)

    def copy_in(self, source: Path, name: str, *, mode: int = 0o644) -> str:
        """Copy ``source`` in as ``name`` (durably, as :meth:`write`); returns the sha256 of what was written, read
        back from the written file (a bad card or a full disk shows here)."""
        result: dict[str, str] = {}

        def fill(f: BinaryIO) -> None:
            with open(source, "rb") as src:
                while chunk := src.read(CHUNK):
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            digest = hashlib.sha256()
            while chunk := f.read(CHUNK):
                digest.update(chunk)
            result["sha256"] = digest.hexdigest()

        self._replace(name, fill, mode, None)
        return result["sha256"]

    def _replace(self, name: str, fill: Callable[[BinaryIO], object], mode: int, owner: tuple[int, int] | None) -> None:
        tmp = _temporary(name)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        try:
            with os.fdopen(fd, "w+b") as f:
                fill(f)
                f.flush()
                os.fchmod(f.fileno(), mode)
                if owner is not None:
                    os.fchown(f.fileno(), *owner)
                os.fsync(f.fileno())
        except BaseException:
            self._discard(tmp)
            raise
        self._rename_into_place(tmp, name)

    def symlink(self, target: str | os.PathLike[str], name: str) -> None:
        """Point the link ``name`` at ``target`` with one rename: never missing, even on a power cut."""
        tmp = _temporary(name)
        os.symlink(target, tmp, dir_fd=self.fd)
        self._rename_into_place(tmp, name)

    def _rename_into_place(self, tmp: str, name: str) -> None:
        try:
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self._discard(tmp)
            raise
        self.sync()

    def _discard(self, tmp: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=self.fd)

    def unlink(self, name: str) -> bool:
        """Remove a name (a link is removed, never followed); False when it was not there."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        self.sync()
        return True


def _temporary(name: str) -> str:
    """A name beside ``name`` that nobody can have planted in advance (O_EXCL fails if someone did)."""
    return f".{name}.{secrets.token_hex(4)}.tmp"


def _child(parent: Directory, name: str, *, create: bool, mode: int, own: bool) -> Directory:
    if "/" in name or name in ("", ".", ".."):
        raise UnsafePathError(f"{parent.path}: {name!r} is not one name")
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent.fd)
    child = Directory.__new__(Directory)
    child.path = parent.path / name
    try:
        child.fd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=parent.fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(f"{child.path}: not a directory (a link is not followed)") from None
        raise
    if own and not _trusted(st := os.fstat(child.fd)):
        child.close()
        raise UnsafePathError(f"{child.path}: must belong to root alone, but {_owner(st)}")
    return child


def write_file(path: Path, data: bytes | str, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Replace the file at ``path`` durably, without following a link planted in its directory."""
    with Directory(path.parent, create=True) as d:
        d.write(path.name, data, mode=mode, owner=owner)


def flush_filesystem(path: str | os.PathLike[str]) -> None:
    """Everything written to the file system that holds ``path`` reaches the disk (syncfs(2)): the data, inodes and
    directory entries of a tree pip or cp wrote, in one call instead of one fsync per file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            os.sync()
            return
        if syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs failed: {os.strerror(code)}", os.fspath(path))
    finally:
        os.close(fd)


def replace_durably(written: Path, target: Path) -> None:
    """``written`` (a finished file beside ``target``, e.g. ``x.partial``) flushed, renamed over ``target``, and the
    directory flushed: for files the service writes into its own state directory."""
    fd = os.open(written, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(written, target)
    with Directory(target.parent) as d:
        d.sync()
