"""The installer's file primitives (appliance/release/safefs.py) and version order (versions.py): links are followed
only where nobody but root can plant them, files are replaced through a temporary name, and downgrades are
recognised the way PEP 440 orders versions."""

from __future__ import annotations

import os

import pytest

from appliance.release.safefs import Directory, UnsafePathError, open_dir, write_file
from appliance.release.verify import BundleError
from appliance.release.versions import is_older, version_key

NOBODY = 65534


@pytest.fixture
def as_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: a directory of another account is what makes a link untrusted")


def test_a_link_in_a_directory_only_root_can_change_is_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    fd = open_dir(tmp_path / "link")
    try:
        assert os.fstat(fd).st_ino == (tmp_path / "real").stat().st_ino
    finally:
        os.close(fd)


def test_a_link_in_a_directory_another_account_owns_is_not_followed(tmp_path, as_root):
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "etc").mkdir()
    (state / "models").symlink_to(tmp_path / "etc")
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match="a symbolic link in a directory that uid 65534 can change"):
        open_dir(state / "models")
    with pytest.raises(UnsafePathError, match="not a directory"), Directory(state) as d:
        d.subdir("models")
    (state / "models").unlink()
    (state / "models").mkdir()
    os.chown(state / "models", NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match="must belong to root alone"), Directory(state) as d:
        d.subdir("models", own=True)


def test_writing_replaces_a_planted_link_and_leaves_its_target_alone(tmp_path):
    target = tmp_path / "bundle-signers"
    target.write_text("trusted\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "report.json").symlink_to(target)
    write_file(tmp_path / "dir" / "report.json", "{}\n", mode=0o640)
    assert target.read_text() == "trusted\n"
    report = tmp_path / "dir" / "report.json"
    assert not report.is_symlink() and report.read_text() == "{}\n" and report.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path / "dir") == ["report.json"], "no temporary file left"


def test_reading_refuses_links_hard_links_and_fifos(tmp_path):
    (tmp_path / "secret").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path / "secret")
    os.link(tmp_path / "secret", tmp_path / "d" / "hard")
    os.mkfifo(tmp_path / "d" / "fifo")
    (tmp_path / "d" / "plain").write_text("ok")
    with Directory(tmp_path / "d") as d:
        for name in ("link", "hard", "fifo"):
            with pytest.raises(UnsafePathError):
                d.read(name)
        assert d.read("plain") == b"ok" and d.read("missing") is None


def test_a_copy_is_checked_and_named_only_when_whole(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"weights" * 1000)
    (tmp_path / "store").mkdir()
    with Directory(tmp_path / "store") as store:
        digest = store.copy_in(source, "abc-model.gguf")
        assert store.sha256("abc-model.gguf") == digest
        assert store.names() == ["abc-model.gguf"]


@pytest.mark.parametrize("older, newer", [
    ("0.1.0", "0.1.1"), ("0.1.9", "0.1.10"), ("1.0.dev1", "1.0a1"), ("1.0a1", "1.0b2"), ("1.0b2", "1.0rc1"),
    ("1.0rc1", "1.0"), ("1.0", "1.0.post1"), ("1.0.post1.dev1", "1.0.post1"), ("0.9", "1.0.0"),
])
def test_versions_are_ordered_as_pep_440_orders_them(older, newer):
    assert is_older(older, newer) and not is_older(newer, older)


def test_equal_versions_are_no_downgrade_and_nonsense_is_refused():
    assert version_key("1.0") == version_key("1.0.0") and not is_older("1.0+local", "1.0")
    with pytest.raises(BundleError, match="not a PEP 440 version"):
        version_key("latest")
