"""What a killed process leaves: its temp files are removed by the next write into their folder, and its
decode workers follow it within seconds."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import io
from pipeline.data.images import decode_images
from pipeline.io import PROJECT_ROOT


def _children(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _stat(int(entry.name))[1:2] == [str(pid)]:
            found.append(int(entry.name))
    return found


def _stat(pid: int) -> list[str]:
    """[state, parent pid, ...] of a live process; [] for one that is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []
    return [] if fields[0] in ("Z", "X") else fields


def _loky_workers(pid: int) -> list[int]:
    workers = []
    for child in _children(pid):
        try:
            if b"LokyProcess" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except OSError:
            pass
    return workers


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The processes of `pids` still alive after up to `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(_stat(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _stat(p)]


def _kill_session(process: subprocess.Popen) -> None:
    """Whatever is left of a stage's session (it was started with start_new_session=True)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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


def test_decode_workers_exit_within_seconds_of_a_kill_9_of_their_stage(tiny_data):
    files = sorted(str(p) for p in (tiny_data / "train" / "images").rglob("*") if p.is_file())
    code = (f"from pipeline.data.images import decode_images\nfiles = {files!r} * 20\n"
            "while True:\n    decode_images(files, [0, 0, 1, 1], [32, 40], 10**8, workers=2)\n")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    try:
        workers, deadline = [], time.time() + 60
        while len(workers) < 2 and time.time() < deadline:
            workers = _loky_workers(process.pid)
            time.sleep(0.05)
        assert len(workers) == 2, "the decode never started its 2 workers"
        time.sleep(1)  # decoding
        children = _children(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert _gone_within(children, 5) == []
    finally:
        _kill_session(process)


def test_decoding_in_workers_gives_the_same_pixels_as_in_process(tiny_data):
    files = sorted(str(p) for p in (tiny_data / "train" / "images").rglob("*") if p.is_file())[:70]
    one, _ = decode_images(files, [0, 0, 1, 1], [16, 20], 10**8, workers=1)
    two, _ = decode_images(files, [0, 0, 1, 1], [16, 20], 10**8, workers=2)
    assert (one == two).all()
