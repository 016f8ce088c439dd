"""spatialalign_jax.common.atomic: what a finished, failed or interrupted write leaves behind."""

import os

import pytest

from spatialalign_jax.common import atomic


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _write_folder(tmp, name, text="x"):
    tmp.mkdir()
    (tmp / name).write_text(text)


@pytest.mark.parametrize("before", ["nothing", "file", "folder", "symlink"])
@pytest.mark.parametrize("after", ["file", "folder"])
def test_output_replaces_whatever_was_there(tmp_path, before, after):
    dst = tmp_path / "out"
    if before == "file":
        dst.write_text("old")
    elif before == "folder":
        _write_folder(dst, "old")
    elif before == "symlink":
        (tmp_path / "target").write_text("kept")
        dst.symlink_to(tmp_path / "target")
    with atomic.atomic_output(dst) as tmp:
        assert not tmp.exists() and tmp.parent == tmp_path
        if after == "file":
            tmp.write_text("new")
        else:
            _write_folder(tmp, "new")
    assert (dst.read_text() if after == "file" else _listing(dst)) == ("new" if after == "file" else ["new"])
    assert not dst.is_symlink()
    assert _listing(tmp_path) == (["out", "target"] if before == "symlink" else ["out"])
    if before == "symlink":
        assert (tmp_path / "target").read_text() == "kept"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_keeps_the_old_output(tmp_path, error):
    dst = tmp_path / "out"
    _write_folder(dst, "old")
    with pytest.raises(error):
        with atomic.atomic_output(dst) as tmp:
            _write_folder(tmp, "half")
            raise error("boom")
    assert _listing(tmp_path) == ["out"] and _listing(dst) == ["old"]


def test_interruption_between_the_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    _write_folder(dst, "old")
    real_replace = os.replace

    def replace(src, target):
        if ".tmp-" in str(src):
            raise KeyboardInterrupt  # the second rename (new output into place) never happens
        real_replace(src, target)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_output(dst) as tmp:
            _write_folder(tmp, "new")
    assert _listing(tmp_path) == ["out"] and _listing(dst) == ["old"]


def test_body_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="nothing was written"):
        with atomic.atomic_output(tmp_path / "out"):
            pass
    assert _listing(tmp_path) == []


def test_atomic_path_file_write(tmp_path):
    atomic.write_text_atomic(tmp_path / "sub" / "a.txt", "one")
    atomic.write_text_atomic(tmp_path / "sub" / "a.txt", "two")
    assert (tmp_path / "sub" / "a.txt").read_text() == "two" and _listing(tmp_path / "sub") == ["a.txt"]


def test_a_kill_between_the_renames_is_repaired_by_the_next_write(tmp_path):
    """A kill after the old output was moved aside leaves only `.out.old-*`: the next atomic_output of
    the same path puts it back first, so a failing next write still leaves the old output."""
    dst = tmp_path / "out"
    _write_folder(tmp_path / ".out.old-123-abcd", "old")
    with pytest.raises(OSError):
        with atomic.atomic_output(dst) as tmp:
            _write_folder(tmp, "new")
            raise OSError("disk full")
    assert _listing(tmp_path) == ["out"] and _listing(dst) == ["old"]


def test_files_get_the_mode_of_a_plain_file(tmp_path):
    """mkstemp makes owner-only files; the written output has the mode the umask gives new files (the
    other process of the project, scorer or trainer, may run as another user)."""
    atomic.write_text_atomic(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK


def test_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("")
    assert atomic.file_in_the_way(tmp_path / "f") == tmp_path / "f"
    assert atomic.file_in_the_way(tmp_path / "f" / "a" / "b") == tmp_path / "f"
    assert atomic.file_in_the_way(tmp_path / "new" / "a") is None
    assert atomic.file_in_the_way(tmp_path) is None


def test_check_output_one_rule_for_existing_outputs(tmp_path):
    """New or an empty folder: written; anything else only with overwrite (the message names the flag);
    never under a file."""
    assert atomic.check_output(tmp_path / "new" / "deep", overwrite=False) == tmp_path / "new" / "deep"
    (tmp_path / "empty").mkdir()
    assert atomic.check_output(tmp_path / "empty", overwrite=False) == tmp_path / "empty"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / ".hidden").write_text("")
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    for name, kind in (("full", "a folder with files in it"), ("file", "a file"), ("link", "a link")):
        with pytest.raises(FileExistsError, match=f"already exists \\({kind}\\); pass --force to replace all of it"):
            atomic.check_output(tmp_path / name, overwrite=False, flag="--force")
        assert atomic.check_output(tmp_path / name, overwrite=True) == tmp_path / name
    with pytest.raises(FileExistsError, match="which is a file"):
        atomic.check_output(tmp_path / "file" / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "full", "link"]  # nothing made
