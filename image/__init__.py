"""Build tooling: the offline bundle, the root filesystem, the SD-card image and its QEMU twin (docs/image.md).

Runs on the build machine (Debian bookworm, root), never on a device. Each step prints what it does and how long
it took, and keeps what it downloaded or built under the cache directory, so a rebuild with nothing changed works
with no network.
"""
