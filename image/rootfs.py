"""The root file system, in two stages: a cached Debian base (mmdebstrap), then the appliance layer on a copy of it.

The base holds every Debian package of image/recipe.toml, the kernel, its initramfs and, for arm64, the Raspberry
Pi firmware with /boot/firmware filled by raspi-firmware's own hook. Built through qemu-user for a foreign
architecture (binfmt_misc), it is the slow part (minutes to tens of minutes), so it is kept as a tarball keyed by
the recipe. The appliance layer (the bundle installed by its own installer, config, users, units) takes a minute.

An arm64 build chroot from the same mirror compiles the few Python packages that have no arm64 wheel.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

from image.steps import REPO, BuildError, cache_dir, digest_of, run, say, step

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "recipe.toml"
OVERLAY = HERE / "overlay"
SDIST_ENV = {"lgpio": {"PYPI": "1"}}  # lgpio links its C library in statically only when told it is for PyPI


def recipe() -> dict:
    return tomllib.loads(RECIPE.read_text())


def ensure_binfmt(arch: str) -> None:
    """Foreign binaries in a chroot run through qemu-user-static, registered with binfmt_misc."""
    if arch == {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine):
        return
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)])
    if not (misc / "qemu-aarch64").exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    if not (misc / "qemu-aarch64").exists():
        raise BuildError("qemu-aarch64 is not registered with binfmt_misc (apt install qemu-user-static)")


def _base_files(arch: str) -> list[Path]:
    folder = HERE / "base" / arch
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _mmdebstrap(arch: str, packages: list[str], out: Path, *, variant: str, hooks: list[str]) -> None:
    spec = recipe()
    debs = cache_dir() / "debs" / arch
    debs.mkdir(parents=True, exist_ok=True)
    ensure_binfmt(arch)
    partial = out.with_name(out.name + ".partial")
    command = [
        "mmdebstrap", f"--variant={variant}", f"--architectures={arch}", "--format=tar",
        f"--components={' '.join(spec['components'])}", f"--include={','.join(packages)}",
        # files placed before their package is installed are kept (image/base/: raspi-firmware's settings)
        "--dpkgopt=force-confold", "--dpkgopt=force-confdef",
        # a local cache of .debs: a rebuild downloads only what changed
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives', f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
        "--skip=essential/unlink", *hooks, f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
        spec["suite"], str(partial), spec["mirror"]]
    # INITRD=No: the kernel's postinst skips its initramfs; one is made once, at the end (under qemu-user each
    # run of mkinitramfs takes minutes)
    run(command, env={"INITRD": "No"}, timeout=7200)
    partial.replace(out)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder of a cache entry at a time: a second one (a prefetch running beside the tests) waits for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cached(kind: str, arch: str, key: str, build) -> Path:
    out = cache_dir() / "rootfs" / f"{kind}-{arch}-{key}.tar"
    with _locked(out):
        if out.is_file():
            say(f"{kind} root file system for {arch}: cached {out.name}")
            return out
        build(out)
    for stale in out.parent.glob(f"{kind}-{arch}-*.tar"):
        if stale != out:
            stale.unlink()
    return out


def base(arch: str) -> Path:
    """The cached base tarball for ``arch``, built when the recipe or image/base/ changed."""
    spec = recipe()
    hooks = []
    if (HERE / "base" / arch).is_dir():
        hooks.append(f"--essential-hook=sync-in {HERE / 'base' / arch} /")
    hooks.append('--customize-hook=env -u INITRD chroot "$1" update-initramfs -c -k all')
    slow = " (through qemu-user: 10-20 min)" if arch == "arm64" and os.uname().machine != "aarch64" else ""

    def build(out: Path) -> None:
        with step(f"base root file system for {arch}{slow}"):
            _mmdebstrap(arch, spec["packages"]["common"] + spec["packages"][arch], out, variant="minbase",
                        hooks=hooks)
    return _cached("base", arch, digest_of(RECIPE, *_base_files(arch), arch), build)


def builder(arch: str) -> Path:
    """The cached build chroot for ``arch`` (compilers, Python headers, swig)."""
    spec = recipe()

    def build(out: Path) -> None:
        with step(f"build chroot for {arch}"):
            _mmdebstrap(arch, spec["builder"]["packages"], out, variant="apt", hooks=[])
    return _cached("builder", arch, digest_of(RECIPE, arch, "builder"), build)


def extract(tarball: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(tarball), "-C", str(into)])


# What a Raspberry Pi 4 shows in /proc/cpuinfo. Under qemu-user a program reads the build machine's x86 one, and
# some (onnxruntime's cpuinfo) crash on it: an arm64 chroot gets this one instead.
PI4_CPUINFO = "".join(
    f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
    f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n" for n in range(4)
) + "Revision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n"


def chroot_run(rootfs: Path, command: list[str], env: dict | None = None, timeout: float = 3600) -> str:
    """Run a command inside ``rootfs`` with /proc, /sys and /dev mounted in a private mount namespace (the mounts
    vanish with it, even if the build is killed)."""
    r = str(rootfs)
    with tempfile.NamedTemporaryFile("w", prefix="cpuinfo-") as cpuinfo:
        cpuinfo.write(PI4_CPUINFO)
        cpuinfo.flush()
        foreign = (rootfs / "usr/lib/aarch64-linux-gnu").is_dir() and os.uname().machine != "aarch64"
        script = (f'mount -t proc proc "{r}/proc" && '
                  + (f'mount --bind "{cpuinfo.name}" "{r}/proc/cpuinfo" && ' if foreign else "")
                  + f'mount -t sysfs sys "{r}/sys" && mount --rbind /dev "{r}/dev" && exec chroot "{r}" "$@"')
        envs = [f"{k}={v}" for k, v in (env or {}).items()]
        return run(["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", script, "chroot",
                    "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8", *envs,
                    *command], timeout=timeout)


def build_sdist_wheel(arch: str, requirement: str, wheels: Path) -> Path:
    """A wheel compiled in the ``arch`` build chroot from the package's source release (cached in ``wheels``)."""
    from image.wheels import check_binaries, sdist
    sources = cache_dir() / "sdists"
    sources.mkdir(parents=True, exist_ok=True)
    source = sdist(requirement, sources)
    name = source.name[: -len(".tar.gz")]
    machine = {"arm64": "aarch64", "amd64": "x86_64"}[arch]
    found = sorted(wheels.glob(f"{name}-*{machine}*.whl"))
    if found:
        return found[-1]
    with step(f"compiling {source.name} for {arch} in the build chroot"), tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "root"
        extract(builder(arch), rootfs)
        (rootfs / "src").mkdir()
        (rootfs / "out").mkdir()
        shutil.copy2(source, rootfs / "src")
        package = name.rsplit("-", 1)[0].lower()
        chroot_run(rootfs, ["python3", "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
                            "-w", "/out", f"/src/{source.name}"], env=SDIST_ENV.get(package, {}))
        built = next((rootfs / "out").glob("*.whl"))
        check_binaries(built, arch)
        shutil.copy2(built, wheels / built.name)
        return wheels / built.name


def _copy_overlay(rootfs: Path) -> None:
    """image/overlay/ into the tree: root-owned, modes as in the repository (executables stay executable)."""
    for source in sorted(OVERLAY.rglob("*")):
        target = rootfs / source.relative_to(OVERLAY)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        shutil.copyfile(source, target)
        mode = 0o440 if "sudoers.d" in source.parts else (0o755 if os.access(source, os.X_OK) else 0o644)
        os.chmod(target, mode)
        os.chown(target, 0, 0)


def default_config(model_id: str) -> str:
    """The overlay's appliance.toml with ``models.default`` set to the bundle's first model."""
    text = (OVERLAY / "etc/appliance/appliance.toml").read_text()
    return re.sub(r'(?m)^default = "[^"]*"', f'default = "{model_id}"', text, count=1)


def appliance_layer(arch: str, bundle: Path, signers: str, rootfs: Path) -> None:
    """The appliance on top of the base: installed from the bundle by the installer the device itself will run."""
    from appliance.release.verify import verify
    with tempfile.NamedTemporaryFile("w", suffix=".signers") as trusted:
        trusted.write(signers)
        trusted.flush()
        checked = verify(bundle, Path(trusted.name), arch=arch)  # refuse early, before the slow extract
    model_ids = tomllib.loads((bundle / "bundle.toml").read_text())["models"]
    with step("appliance layer: base extracted"):
        if rootfs.exists():
            shutil.rmtree(rootfs)
        extract(base(arch), rootfs)
    with step("appliance layer: config, users, mosquitto"):
        _copy_overlay(rootfs)
        (rootfs / "etc/appliance/appliance.toml").write_text(default_config(model_ids[0]))
        (rootfs / "etc/appliance/bundle-signers").write_text(signers)
        for conf in ("appliance.conf", "appliance-lan.conf"):  # the LAN listener: plain MQTT until TLS replaces it
            shutil.copyfile(REPO / "systemd/mosquitto" / conf, rootfs / "etc/mosquitto/conf.d" / conf)
        shutil.copyfile(REPO / "systemd/mosquitto/appliance.acl", rootfs / "etc/mosquitto/appliance.acl")
        run(["systemd-sysusers", f"--root={rootfs}"])
        from appliance.firstboot.apply import IMAGE_HOSTNAME, ids
        for user, home in (("admin", "home/admin"), ("appliance", "var/lib/appliance")):
            (rootfs / home).mkdir(parents=True, exist_ok=True)
            os.chown(rootfs / home, *ids(rootfs, user=user))
            os.chmod(rootfs / home, 0o750)
        (rootfs / "etc/hostname").write_text(IMAGE_HOSTNAME + "\n")  # first boot makes it the device's own
        if arch == "arm64":
            _compute_module_device_tree(rootfs)
    with step(f"appliance layer: installing release {checked.release} from the bundle"
              + (" (through qemu-user)" if arch == "arm64" else "")):
        inside = rootfs / "var/tmp/bundle"
        shutil.copytree(bundle, inside)
        try:
            # the installer also puts itself in /usr/local/sbin, where the device runs it for every update
            chroot_run(rootfs, ["/usr/bin/python3", "/var/tmp/bundle/bin/appliance-install-bundle", "--arch", arch,
                                "install", "/var/tmp/bundle"])
        finally:
            shutil.rmtree(inside)
    with step("appliance layer: units and clean-up"):
        run(["systemctl", f"--root={rootfs}", "enable", "appliance.service", "appliance-firstboot.service",
             "mosquitto.service", "ssh.service", "NetworkManager.service", "earlyoom.service"])
        _clean(rootfs)


# raspi-firmware's kernel hook appends /etc/default/raspi-firmware-custom to the config.txt it writes
CM4_CONFIG = """\
# A Compute Module 4 loads a Pi 4 B's device tree unless told otherwise (Debian bug #1010317), and its on-board
# Ethernet and USB then do not work.
[cm4]
device_tree=bcm2711-rpi-cm4-io.dtb
[all]
"""


def _compute_module_device_tree(rootfs: Path) -> None:
    (rootfs / "etc/default/raspi-firmware-custom").write_text(CM4_CONFIG)
    config = rootfs / "boot/firmware/config.txt"
    text = config.read_text()
    if CM4_CONFIG not in text:  # the base ran the hook before this file existed: what the next kernel update writes
        config.write_text(f"{text}\n# Inserted by /etc/default/raspi-firmware-custom\n{CM4_CONFIG}")


def _clean(rootfs: Path) -> None:
    """What must not be the same on every device, or need not be in the image."""
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each device makes its own at first boot
    (rootfs / "etc/machine-id").write_text("")  # empty: systemd makes one at first boot (ConditionFirstBoot)
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "tmp/*",
                    "var/tmp/*", "var/log/*.log", "root/.cache"):
        for path in rootfs.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def tree_size(rootfs: Path) -> int:
    out = subprocess.run(["du", "-sb", "--exclude=./boot/firmware", "."], cwd=rootfs, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def main(argv: list[str] | None = None) -> int:
    """``python3 -m image.rootfs prefetch arm64 ...``: build the slow cached stages ahead (CI starts this beside
    the venv build and the tests; the image tests then find them ready, or wait for them)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python3 -m image.rootfs", description=main.__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["prefetch"])
    parser.add_argument("arches", nargs="+", help="arm64, amd64; builder-arm64 for the build chroot")
    args = parser.parse_args(argv)
    try:
        for name in args.arches:
            builder(name.split("-", 1)[1]) if name.startswith("builder-") else base(name)
    except BuildError as exc:
        print(f"prefetch: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
