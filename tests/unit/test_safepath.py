"""Walks below a guest-writable tree never follow a symlink or leave the tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.sandbox import safepath
from shim.sandbox.safepath import UnsafePathError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path / "root"


def test_make_dirs_creates_each_component_with_its_mode(root: Path) -> None:
    safepath.make_dirs(root, "a/b/c", 0o700)
    assert (root / "a" / "b" / "c").is_dir()
    assert (root / "a").stat().st_mode & 0o777 == 0o700


def test_make_dirs_refuses_a_planted_symlink(root: Path) -> None:
    outside = root.parent / "outside"
    (root / "c2").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="a symlink is in the way"):
        safepath.make_dirs(root, "c2/rootfs")
    assert list(outside.iterdir()) == []


def test_make_dirs_refuses_a_symlink_deeper_down(root: Path) -> None:
    (root / "c").mkdir()
    (root / "c" / "mounts").symlink_to("/")
    with pytest.raises(UnsafePathError):
        safepath.make_dirs(root, "c/mounts/0-vol")


def test_dot_dot_and_absolute_paths_are_refused(root: Path) -> None:
    for rel in ("../outside/x", "/etc/x", "a/../../x"):
        with pytest.raises(UnsafePathError, match="not a plain relative path"):
            safepath.make_dirs(root, rel)


def test_make_file_never_writes_through_a_symlink(root: Path) -> None:
    victim = root.parent / "outside" / "victim"
    victim.write_text("keep")
    (root / "f").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        safepath.make_file(root, "f")
    assert victim.read_text() == "keep"


def test_mount_target_names_exactly_the_checked_directory(root: Path) -> None:
    safepath.make_dirs(root, "c/rootfs")
    with safepath.mount_target(root, "c/rootfs") as target:
        assert target.startswith("/proc/self/fd/")
        assert os.path.realpath(target) == str(root / "c" / "rootfs")


def test_mount_target_refuses_a_symlinked_target(root: Path) -> None:
    (root / "c").mkdir()
    (root / "c" / "rootfs").symlink_to(root.parent / "outside")
    with pytest.raises(UnsafePathError), safepath.mount_target(root, "c/rootfs"):
        pass


def test_remove_tree_removes_files_and_dirs_but_not_what_a_symlink_points_at(root: Path) -> None:
    outside = root.parent / "outside"
    (outside / "precious").write_text("x")
    safepath.make_dirs(root, "c/mounts/0-vol")
    (root / "c" / "mounts" / "link").symlink_to(outside)
    (root / "c" / "file").write_text("y")
    safepath.remove_tree(root, "c")
    assert not (root / "c").exists()
    assert (outside / "precious").read_text() == "x"


def test_remove_tree_through_a_symlinked_parent_is_refused(root: Path) -> None:
    outside = root.parent / "outside"
    (outside / "c").mkdir()
    (root / "sb").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        safepath.remove_tree(root, "sb/c")
    assert (outside / "c").is_dir()


def test_remove_tree_of_nothing_is_fine(root: Path) -> None:
    safepath.remove_tree(root, "absent")
