"""The system tier: offline bundles built for real, images built with mmdebstrap and genimage, booted under QEMU.

Image tests need root (mmdebstrap, chroot, binfmt_misc) and use the build cache (``APPLIANCE_CACHE``, default
~/.cache/appliance-image); the first build on a machine takes long (docs/image.md has the figures)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import image_builds as image_builds_module
from tests.support import tiny_models


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/system/" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
            # the first test of a module builds its image in the fixture's setup: on a machine with no build
            # cache that is the Debian base under qemu-user and a cross-compiled llama.cpp (docs/image.md)
            item.add_marker(pytest.mark.timeout(5400 if item.get_closest_marker("image") else 900))
    # timing-bound modules last, in the order their prebuilt images become ready (a stable sort: pytest-randomly's
    # shuffle stays within each group, and a module's tests stay together)
    build_rank = {fixture: rank for rank, fixture in enumerate(image_builds_module.JOBS.values(), start=1)}
    module_rank: dict[Path, int] = {}
    for item in items:
        needs = max((build_rank.get(name, 0) for name in item.fixturenames), default=0)
        module_rank[item.path] = max(module_rank.get(item.path, 0), needs)
    items.sort(key=lambda item: (item.get_closest_marker("quiet") is not None, module_rank[item.path]))


@pytest.fixture(scope="session", autouse=True)
def image_builds(request, tmp_path_factory):
    """The images the selected quiet tests boot, built by a child process at the lowest priority beside the tests
    that tolerate a busy machine (tests/support/image_builds.py); None when no selected test needs one."""
    needed = {name for item in request.session.items for name in item.fixturenames}
    jobs = [job for job, fixture in image_builds_module.JOBS.items() if fixture in needed]
    if not jobs:
        yield None
        return
    builds = image_builds_module.ImageBuilds(
        jobs, tmp_path_factory.mktemp("image-builds"), catalog=request.getfixturevalue("tiny_catalog"),
        key=request.getfixturevalue("signing_key"))
    yield builds
    builds.close()


@pytest.fixture(scope="module", autouse=True)
def quiet_machine(request):
    """A `quiet` test waits until the tiers that `make test` runs beside the system tier have finished
    (scripts/test-tiers names their end in APPLIANCE_TESTS_BESIDE): its bounds assume the machine to itself, but for
    an image still being built at nice 19 (its fixture waits for the image it boots, not for the others). Module
    scope, so that it comes before the module's own fixtures (a booted twin)."""
    if not request.node.get_closest_marker("quiet"):
        return
    started = time.monotonic()
    done = os.environ.get("APPLIANCE_TESTS_BESIDE")
    while done and not os.path.exists(done):
        time.sleep(1)
    if time.monotonic() - started > 1:
        print(f"waited {time.monotonic() - started:.0f} s for the tiers beside to finish")


@pytest.fixture(scope="session")
def tiny_catalog(models_dir, tmp_path_factory) -> Path:
    """A catalog of one tiny model (what test bundles and images carry)."""
    catalog = tmp_path_factory.mktemp("tiny-catalog") / "catalog.toml"
    catalog.write_text(tiny_models.catalog_entry("tiny", models_dir / "tiny-q4_0.gguf", absolute=True,
                                                 template="chatml", commercial_use=True))
    return catalog


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("keys") / "bundle-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(key)], check=True)
    return key


@pytest.fixture
def operator_key(tmp_path) -> Path:
    """The SSH key an operator puts on a card's FAT partition (``authorized_keys``) to log in as ``admin``."""
    key = tmp_path / "operator"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="session")
def bundle_amd64(tmp_path_factory, tiny_catalog, signing_key) -> Path:
    from image import bundle
    return bundle.build("amd64", tmp_path_factory.mktemp("dist"), catalog=tiny_catalog, key=signing_key,
                        tarball=False)


@pytest.fixture(scope="session")
def bundle_amd64_default(tmp_path_factory, signing_key) -> Path:
    """The bundle `make bundle ARCH=amd64` builds: no catalog given, so the embedded default model. (The twin's
    image of it builds its own in image_builds' child: the bundle test runs in the other pytest of `make test`.)"""
    from image import bundle
    return bundle.build("amd64", tmp_path_factory.mktemp("dist-default"), key=signing_key, tarball=False)


@pytest.fixture(scope="session")
def as_root():
    if os.geteuid() != 0:
        pytest.fail("image tests need root (mmdebstrap, chroot, binfmt_misc): run `make test` as root, or leave "
                    "them out with PYTEST_ARGS='-m \"not image\"'")


@pytest.fixture(scope="session")
def amd64_default_image(as_root, image_builds) -> Path:
    """The QEMU twin as `make image ARCH=amd64` builds it: the embedded default model (built beside other tests)."""
    return image_builds.result("amd64-default")["image"]


@pytest.fixture(scope="session")
def amd64_image(as_root, bundle_amd64, signing_key, tmp_path_factory):
    """The QEMU twin, carrying the test bundle (release 0.1.0, the tiny model)."""
    from image import build
    return build.build("amd64", tmp_path_factory.mktemp("image"), bundle=bundle_amd64, key=signing_key,
                       compress=False)
