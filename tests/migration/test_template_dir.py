"""A template directory as a hostile or careless host leaves it: permissions under any
umask, a planted .lock symlink, and a destination that holds somebody else's files."""

import os
import shutil
import stat

import pytest

from stratovirt_py.errors import SnapshotError
from stratovirt_py.migration import writer
from stratovirt_py.migration.format import read_template, write_template

HEADER = {"kvm_api_version": 12}
SECTIONS = {"vm": (1, {"clock": 1})}


def write(d, mem):
    return write_template(str(d), HEADER, SECTIONS, mem)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_000():
    old = os.umask(0)
    yield
    os.umask(old)


def test_files_are_the_owners_only_whatever_the_umask(guest, tmp_path, umask_000):
    d = tmp_path / "tpl"
    write(d, guest)
    gen = os.path.realpath(d / "current")
    assert mode(d) == 0o700 and mode(gen) == 0o700
    for name in ("state", "memory"):
        assert mode(os.path.join(gen, name)) == 0o600, name
    assert mode(d / ".lock") == 0o600
    write(d, guest)                                  # and a replacement too
    assert mode(os.path.realpath(d / "memory")) == 0o600


def test_a_planted_lock_symlink_is_not_followed(guest, tmp_path, monkeypatch):
    d = tmp_path / "tpl"
    d.mkdir()
    victim = tmp_path / "nologin"
    os.symlink(victim, d / ".lock")
    with pytest.raises(SnapshotError, match=r"\.lock is not a plain file"):
        write(d, guest)
    # planted after the directory was checked: the open itself does not follow it
    monkeypatch.setattr(writer, "_check_destination", lambda dir: None)
    with pytest.raises(SnapshotError, match=r"\.lock is a symbolic link"):
        write(d, guest)
    assert not victim.exists()


@pytest.mark.parametrize("plant", [
    lambda d: (d / "notes.txt").write_text("mine"),
    lambda d: (d / "state").write_text("my state, not a template"),
    lambda d: (d / "memory").write_text("my memory"),
    lambda d: ((d / "gen-photos").mkdir(), (d / "gen-photos" / "cat.jpg").write_bytes(b"jpg")),
    lambda d: (d / "gen-x").write_text("a file"),
    lambda d: os.symlink("/etc", d / "current"),
    lambda d: os.symlink("/etc/passwd", d / "state"),
    lambda d: (d / ".tmp-x").mkdir(),
])
def test_a_directory_that_is_not_a_template_is_refused_untouched(guest, tmp_path, plant):
    d = tmp_path / "dest"
    d.mkdir()
    plant(d)
    before = {p: (os.lstat(p).st_mode, os.lstat(p).st_size) for p in d.rglob("*")}
    with pytest.raises(SnapshotError, match="is neither empty nor a template"):
        write(d, guest)
    assert {p: (os.lstat(p).st_mode, os.lstat(p).st_size) for p in d.rglob("*")} == before


def test_empty_directories_templates_and_copies_are_accepted(guest, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty, guest)
    write(empty, guest)                                # over a template of ours
    copy = tmp_path / "copy"
    shutil.copytree(empty, copy, symlinks=False)       # cp -rL: plain state and memory
    shutil.rmtree(copy / "current")
    for g in copy.glob("gen-*"):
        shutil.rmtree(g)
    assert read_template(str(copy)).template_id
    write(copy, guest)
    assert os.path.islink(copy / "state")
