"""Atomic writes: a failed write names the file and leaves the previous version intact."""
import errno
import os

import pytest

from pipeline import io
from pipeline.errors import WriteError


def test_a_full_disk_names_the_file_and_keeps_the_previous_version(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    io.atomic_write_text(target, "previous\n")
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", disk_full)
    with pytest.raises(WriteError, match=r"cannot write .*report.json: No space left on device"):
        io.atomic_write_text(target, "new\n" * 1000)
    monkeypatch.setattr(io.os, "fsync", real_fsync)
    assert target.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


def test_passwords_in_urls_are_redacted_everywhere_in_a_config():
    cfg = {"tune": {"storage": "postgresql://user:pw@host:5432/db"}, "list": ["mysql://a:b@c/d", "plain"], "n": 3}
    assert io.redacted(cfg) == {"tune": {"storage": "postgresql://user:***@host:5432/db"},
                                "list": ["mysql://a:***@c/d", "plain"], "n": 3}
    assert io.redacted("sqlite:///runs/optuna.db") == "sqlite:///runs/optuna.db"
