"""Every wheel the appliance needs on a device of a given architecture, for Debian bookworm's Python 3.11.

- llama-cpp-python has no binary wheels on PyPI: on amd64 it is built here with portable x86 flags, for arm64 it is
  cross-compiled with Debian's aarch64 GCC (armv8-a: the Pi 3 and 4 have no dotprod) and the wheel, whose native
  libraries are all ctypes-loaded, is retagged ``linux_aarch64``.
- lgpio (gpiozero's pin library) has only a source release: for arm64 it is compiled in an arm64 build chroot
  under qemu-user (image/rootfs.py).
- Everything else comes from PyPI as binary wheels for the target platform (``pip download --platform``).

All of it accumulates in ``<cache>/wheels/<arch>``; a bundle takes only what its requirement resolves to, from the
cache alone when that suffices (no network).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from image.steps import REPO, BuildError, run, say, step

PYTHON_VERSION = "3.11"  # Debian bookworm's python3
GLIBC = "2.36"  # Debian bookworm's
MACHINE = {"arm64": "aarch64", "amd64": "x86_64"}
ELF_MACHINE = {"arm64": 183, "amd64": 62}  # e_machine of EM_AARCH64, EM_X86_64
CROSS_CMAKE = ("-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc "
               "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a")
# the x86 flags of DEVELOPERS.md: the native build picks AMX on some CPUs and crashes; these also run under QEMU TCG
X86_CMAKE = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"


def requirement_of(name: str) -> str:
    """pyproject.toml's requirement on ``name`` (from its extras), without extras of its own."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirements in project["optional-dependencies"].values():
        for requirement in requirements:
            if re.match(rf"^{re.escape(name)}(\[[^]]*\])?(?=[<>=!~ ]|$)", requirement):
                return re.sub(r"\[[^]]*\]", "", requirement)
    raise BuildError(f"pyproject.toml has no requirement on {name}")


def _pip(*args: str, env: dict | None = None) -> str:
    return run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], env=env)


def platforms(arch: str) -> list[str]:
    """Every platform tag a wheel for bookworm may carry: pip matches ``--platform`` literally, so each glibc
    version up to bookworm's is named."""
    machine = MACHINE[arch]
    newest = int(GLIBC.split(".")[1])
    return ([f"manylinux_2_{minor}_{machine}" for minor in range(newest, 4, -1)]
            + [f"manylinux{legacy}_{machine}" for legacy in ("2014", "2010", "1")] + [f"linux_{machine}"])


def _platform_args(arch: str) -> list[str]:
    tags = [arg for tag in platforms(arch) for arg in ("--platform", tag)]
    return ["--only-binary=:all:", *tags, "--python-version", PYTHON_VERSION, "--implementation", "cp",
            "--abi", "cp311", "--abi", "abi3", "--abi", "none"]


def _elf_machine(data: bytes) -> int | None:
    return int.from_bytes(data[18:20], "little") if data[:4] == b"\x7fELF" else None


def check_binaries(wheel: Path, arch: str) -> None:
    """Every shared library in the wheel is built for ``arch`` (a host build slipping in would crash on the Pi)."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if ".so" in Path(name).name:
                machine = _elf_machine(archive.open(name).read(20))
                if machine is not None and machine != ELF_MACHINE[arch]:
                    raise BuildError(f"{wheel.name}: {name} is for ELF machine {machine}, not {arch}")


def retag(wheel: Path, platform: str) -> Path:
    """A copy of a ``py3-none-<plat>`` wheel tagged for another platform (WHEEL and RECORD kept consistent)."""
    name, version, python, abi, _ = wheel.name[:-4].split("-")
    target = wheel.with_name(f"{name}-{version}-{python}-{abi}-{platform}.whl")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        info_dir = next(n.split("/")[0] for n in src.namelist() if n.split("/")[0].endswith(".dist-info"))
        wheel_meta = re.sub(r"(?m)^Tag: .*$", f"Tag: {python}-{abi}-{platform}",
                            src.read(f"{info_dir}/WHEEL").decode())
        digest = base64.urlsafe_b64encode(hashlib.sha256(wheel_meta.encode()).digest()).rstrip(b"=").decode()
        for item in src.infolist():
            if item.filename == f"{info_dir}/WHEEL":
                dst.writestr(item, wheel_meta)
            elif item.filename == f"{info_dir}/RECORD":
                record = re.sub(rf"(?m)^{re.escape(info_dir)}/WHEEL,.*$",
                                f"{info_dir}/WHEEL,sha256={digest},{len(wheel_meta.encode())}",
                                src.read(item).decode())
                dst.writestr(item, record)
            else:
                dst.writestr(item, src.read(item))
    return target


def llama_wheel(arch: str, wheels: Path) -> Path:
    """llama-cpp-python for ``arch``, built once and kept in the wheel cache."""
    requirement = requirement_of("llama-cpp-python")
    version = requirement.split("==")[1]  # pinned: the cached wheel is named by it
    cached = wheels / f"llama_cpp_python-{version}-py3-none-linux_{MACHINE[arch]}.whl"
    if cached.is_file():
        return cached
    cross = arch == "arm64"
    with step(f"building {requirement} for {arch}" + (" (cross-compiling, about 5 min)" if cross else "")), \
            tempfile.TemporaryDirectory() as tmp:
        # pip's wheel cache is keyed by version, not by CMAKE_ARGS: a cross build must not get the host's wheel back,
        # while an amd64 build may reuse the one `make` built for the venv with these same flags
        _pip("wheel", "--no-deps", *(["--no-cache-dir"] if cross else []), "--no-binary", "llama-cpp-python",
             "-w", tmp, requirement, env={"CMAKE_ARGS": CROSS_CMAKE if cross else X86_CMAKE})
        built = next(Path(tmp).glob("llama_cpp_python-*.whl"))
        if cross:
            built = retag(built, f"linux_{MACHINE[arch]}")
        check_binaries(built, arch)
        shutil.copy2(built, cached)
    return cached


def sdist(requirement: str, into: Path) -> Path:
    """The source release of ``requirement`` (cached)."""
    name = re.split(r"[<>=!~\[]", requirement)[0].replace("-", "_").lower()
    found = sorted(p for p in into.glob("*.tar.gz") if p.name.lower().startswith(name + "-"))
    if found:
        return found[-1]
    _pip("download", "--no-deps", "--no-binary", ":all:", "-d", str(into), requirement)
    found = sorted(p for p in into.glob("*.tar.gz") if p.name.lower().startswith(name + "-"))
    if not found:
        raise BuildError(f"pip download {requirement} gave no source release")
    return found[-1]


def collect(arch: str, requirement: str, local_wheels: Path, wheels: Path, dest: Path) -> list[Path]:
    """Copy into ``dest`` exactly the wheels ``requirement`` resolves to; the cache first, PyPI only if needed."""
    dest.mkdir(parents=True, exist_ok=True)
    common = [*_platform_args(arch), "--find-links", str(local_wheels), "--find-links", str(wheels)]
    try:
        _pip("download", "--no-index", *common, "-d", str(dest), requirement)
        say(f"wheels for {requirement}: all from the cache {wheels}")
    except BuildError:
        with step(f"downloading wheels for {requirement} ({arch}) into {wheels}"):
            _pip("download", *common, "-d", str(wheels), requirement)
        for own in local_wheels.glob("*.whl"):  # this build's own wheels never become cached ones
            (wheels / own.name).unlink(missing_ok=True)
        _pip("download", "--no-index", *common, "-d", str(dest), requirement)
    for own in local_wheels.glob("*.whl"):
        if (dest / own.name).read_bytes() != own.read_bytes():
            raise BuildError(f"{own.name}: the bundle got another copy than the one just built")
    found = sorted(dest.glob("*.whl"))
    for wheel in found:
        check_binaries(wheel, arch)
    return found
