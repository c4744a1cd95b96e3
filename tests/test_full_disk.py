"""A full disk anywhere: the error is one line naming the file that could not be written; nothing half-written stays."""
import errno
import os
import subprocess
import sys
import textwrap

import pytest

from pipeline import artifacts, io
from pipeline.data import images
from pipeline.data.layout import load_train
from pipeline.data.pixels import image_set
from pipeline.errors import WriteError
from pipeline.io import PROJECT_ROOT
from pipeline.stages import check, folds
from tests.conftest import make_config


class _FullDisk:
    """A file object whose writes fail as they do on a full disk."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every atomic write fails at write(), as on a full disk (the existing version of each file stays)."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(io.os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k)))


def test_check_on_a_full_disk_names_its_report_and_keeps_the_previous_one(tmp_path, data_copy, full_disk, monkeypatch):
    cfg = make_config(tmp_path, data_copy)
    report = tmp_path / "run" / "check" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text("previous\n")
    with pytest.raises(WriteError, match=rf"cannot write {report}: No space left on device"):
        check.run(cfg)
    assert report.read_text() == "previous\n"
    assert os.listdir(report.parent) == ["report.json"]


def test_a_cache_write_on_a_full_disk_names_the_cache_file_and_leaves_nothing(tmp_path, data_copy, full_disk):
    cfg = make_config(tmp_path, data_copy)
    files = image_set(cfg, "train", load_train(cfg)[0]["file"][:4])
    path = images.cache_path(cfg, files)
    with pytest.raises(WriteError, match=rf"cannot write {path}: No space left on device"):
        images.cached_images(cfg, files)
    assert [p for p in path.parent.rglob("*") if p.is_file()] == []  # nor a half pixel manifest


def test_a_lock_file_that_cannot_be_made_is_named(tmp_path, data_copy, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts, "open", no_space, raising=False)
    cfg = make_config(tmp_path, data_copy, "folds.k=3")
    with pytest.raises(WriteError, match=r"folds file .*: cannot create its lock file .*\.lock: No space left on device"):
        folds.run(cfg)


def _can_mount_a_private_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_a_private_tmpfs(), reason="needs unshare -rm (a private mount namespace)")
def test_a_really_full_disk_gives_one_line_naming_the_file_at_each_stage(tmp_path, tiny_data):
    """A real full file system (a 64 KiB tmpfs, filled): check, folds and the pixel cache each name their file."""
    mount = tmp_path / "full"
    mount.mkdir()
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        from pipeline.data import images
        from pipeline.data.layout import load_train
        from pipeline.data.pixels import image_set
        from pipeline.errors import MaskfoldError
        from pipeline.stages import check, folds
        from tests.conftest import make_config
        cfg = make_config(__import__("pathlib").Path({str(mount)!r}), __import__("pathlib").Path({str(tiny_data)!r}),
                          "folds.k=3")
        with open({str(mount / 'filler')!r}, "wb", buffering=0) as filler:  # fill it up
            try:
                while True:
                    filler.write(b"x" * 4096)
            except OSError:
                pass
        for name, step in (("check", lambda: check.run(cfg)), ("folds", lambda: folds.run(cfg)),
                           ("cache", lambda: images.cached_images(cfg, image_set(cfg, "train", load_train(cfg)[0]["file"])))):
            try:
                step()
                print(name, "ok")
            except MaskfoldError as error:
                print(name, "error:", error)
    """)
    command = f"mount -t tmpfs -o size=64k tmpfs {mount} && {sys.executable} -c {_quote(script)}"
    out = subprocess.run(["unshare", "-rm", "sh", "-c", command], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    lines = [line for line in out.stdout.splitlines() if line.split(" ")[0] in ("check", "folds", "cache")]
    assert len(lines) == 3, out.stdout + out.stderr
    assert lines[0] == f"check error: cannot write {mount}/run/check/report.json: No space left on device; " \
                       f"its previous version, if any, is intact"
    assert lines[1].startswith(f"folds error: folds file {mount}/folds/") and "lock file" in lines[1] \
        and lines[1].endswith("No space left on device")
    assert lines[2].startswith(f"cache error: cannot write {mount}/cache/") and ".npy: No space left" in lines[2]
    assert "Traceback" not in out.stderr


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
