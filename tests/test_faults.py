"""What a killed process leaves: its temp files are removed by the next write into their folder."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from pipeline import io
from pipeline.io import PROJECT_ROOT


def test_a_write_killed_before_its_rename_leaves_a_temp_file_that_the_next_write_there_removes(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("previous\n")
    code = f"from pipeline.io import atomic_write_text; atomic_write_text({str(target)!r}, 'new\\n' * 1000)"
    left = []
    for moment in ("during", "before"):  # half the temp file written; all of it, not renamed
        killed = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT,
                                env={**os.environ, "MASKFOLD_KILL_AT": f"report.json:1:{moment}"})
        assert killed.returncode == -signal.SIGKILL
        left.append(sorted(p.name for p in tmp_path.iterdir() if p.name != "report.json"))
        assert target.read_text() == "previous\n"
    # each killed write left its temp file; the second process removed the first one's
    assert len(left[0]) == 1 and re.fullmatch(r"\.report\.json\.\d+\.\w+\.tmp", left[0][0])
    assert len(left[1]) == 1 and left[1] != left[0]
    in_progress = tmp_path / f".other.json.{os.getppid()}.abcdefgh.tmp"  # a live process's write: never touched
    in_progress.write_text("half")
    io.atomic_write_text(tmp_path / "other.txt", "x\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.json", "other.txt", in_progress.name])
