"""Kill it anywhere: same answer, nothing lost, nothing left behind.

Every stage runs as a subprocess on a tiny config and is killed with SIGKILL at a point drawn from a seed:
an atomic write named through pipeline.io's fault hook (MASKFOLD_KILL_AT, half-written, written but not renamed,
or renamed), the moment check's decode workers start, or a time drawn inside a training epoch. The stage and the
rest of the chain then run again, and the run must end with the uninterrupted run's submission.csv, ensemble.json
and OOF report byte for byte, every other output equal in content (timings aside), and no temp file anywhere.

The fast variant (one chain, one kill in each stage) runs with the suite. The full one (every point from a
snapshot of the uninterrupted run) is marked `faults`: `./run.sh test-faults` or MASKFOLD_FULL_FAULTS=1.
MASKFOLD_FAULT_SEED picks the draws (default 9).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import io
from pipeline.data.images import decode_images
from pipeline.io import PROJECT_ROOT

COMPETITION = ("synth", "check", "folds", "train", "oof", "infer", "ensemble")  # to submission.csv
CHAIN = (*COMPETITION, "pseudo", "export", "predict")  # then the pseudo-labels, the bundle and the door's predict
TINY = ["synth.people=12", "synth.eval_people=3", "synth.image_size=[96,128]", "data.image_size=[32,40]", "folds.k=2",
        "model.backbones=[mobilenetv3_small_050]", "train.epochs=3", "train.patience=10", "train.batch_size=16",
        "infer.tta=[none,hflip]"]
SEED = int(os.environ.get("MASKFOLD_FAULT_SEED", "9"))
FULL = os.environ.get("MASKFOLD_FULL_FAULTS") == "1"
STAGE_TIMEOUT = 300


# ---------------------------------------------------------------- processes


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


class Workdir:
    """One pipeline (data, folds, cache, run) under one folder, its stages run as subprocesses in their own sessions."""

    def __init__(self, root: Path, logs: Path):
        self.root, self.logs = root, logs
        self.runs = 0
        logs.mkdir(parents=True, exist_ok=True)

    def command(self, stage: str, *overrides: str) -> list[str]:
        data = self.root / "data"
        arguments = ["--input", str(data / "eval" / "images")] if stage == "predict" else []
        return [sys.executable, "-m", f"pipeline.stages.{stage}", *arguments, "-c", "configs/demo.yaml", f"data.root={data}",
                f"synth.out={data}", f"data.label_fixes={data / 'label_fixes.csv'}", f"output.dir={self.root / 'run'}",
                f"folds.dir={self.root / 'folds'}", f"data.cache_dir={self.root / 'cache'}", "data.num_workers=1",
                "synth.workers=1", *TINY, *overrides]

    @staticmethod
    def env(**extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MASKFOLD_")}
        return {**env, "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1", **extra}

    def log(self, stage: str) -> Path:
        self.runs += 1
        return self.logs / f"{self.runs:03d}-{stage}.log"

    def run(self, stage: str, *overrides: str, **env: str) -> tuple[int, str]:
        """(exit status, path of its log); a status of -9 is a SIGKILL."""
        log = self.log(stage)
        with open(log, "w") as out:
            process = subprocess.Popen(self.command(stage, *overrides), cwd=PROJECT_ROOT, env=self.env(**env),
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                status = process.wait(timeout=STAGE_TIMEOUT)
            finally:
                _kill_session(process)
        return status, str(log)

    def must_run(self, stage: str, why: str, **env: str) -> None:
        status, log = self.run(stage, **env)
        assert status == 0, f"{why}: {stage} exited with {status}:\n{_tail(log)}"

    def popen(self, stage: str, *overrides: str, read_lines: bool = True, **env: str) -> tuple[subprocess.Popen, str]:
        """A running stage; with read_lines its stdout is a pipe the caller reads (its log has stderr only)."""
        log = self.log(stage)
        with open(log, "w") as out:
            process = subprocess.Popen(self.command(stage, *overrides), cwd=PROJECT_ROOT, env=self.env(**env),
                                       stdout=subprocess.PIPE if read_lines else out, stderr=out, text=True,
                                       start_new_session=True)
        return process, str(log)


def _tail(log: str) -> str:
    """The end of a stage's log, less progress bars."""
    text = Path(log).read_text(errors="replace").replace("\r", "\n")
    return "\n".join(line for line in text.splitlines() if line.strip() and "it/s]" not in line)[-3000:]


# ---------------------------------------------------------------- what a run leaves


def _normalised(value):
    """A JSON or checkpoint value without its timings (images_per_s, data_wait), tensors as digests."""
    import torch

    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in sorted(value.items())
                if k not in ("images_per_s", "data_wait", "started", "finished")}
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if isinstance(value, torch.Tensor):
        return str(value.dtype), tuple(value.shape), _digest(value.detach().cpu().numpy().tobytes())
    return value


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def outcome(root: Path) -> dict:
    """Everything a run leaves that must not depend on kills: each file's content, less what legitimately differs.

    Left out: TensorBoard event files (wall times in their names and records), lock files, timings. The cache is
    compared by content (its file names hold image mtimes, which a re-run synth changes); so are the eval-images
    key and the key and token it enters in inference stamps.
    """
    import torch

    files, cache = {}, []
    for path in sorted(root.rglob("*")):
        rel = Path(re.sub(r"bundle-[0-9a-f]+-\d+", "bundle-VERSION", str(path.relative_to(root))))  # export's time
        if not path.is_file() or "tb" in rel.parts or (path.name.startswith(".") and path.name.endswith(".lock")):
            continue
        if rel.parts[0] == "cache":
            cache.append(_digest(path.read_bytes()))
        elif path.suffix == ".pt":
            files[str(rel)] = _normalised(torch.load(path, map_location="cpu", weights_only=True))
        elif path.name == "metrics.jsonl":
            files[str(rel)] = [_normalised(json.loads(line)) for line in path.read_text().splitlines()]
        elif path.suffix == ".json":
            data = _normalised(json.loads(path.read_text()))
            if rel.parts[:2] == ("run", "infer") and path.name == "done.json":
                data["identity"].pop("eval_images")
                data.pop("key"), data.pop("token")
            elif path.name == "ensemble.done.json" or (rel.parts[1:2] == ("bundle-VERSION",) and path.name == "done.json"):
                data["identity"].pop("infer" if path.name == "ensemble.done.json" else "ensemble")  # infer tokens'
                data.pop("key"), data.pop("token")  # eval-images key, as above
            files[str(rel)] = data
        else:
            files[str(rel)] = _digest(path.read_bytes())
    files["cache/*"] = sorted(cache)
    return files


def assert_same_outcome(root: Path, reference: "Reference", where: str) -> None:
    for name in ("run/submission.csv", "run/ensemble.json", "run/oof/report.json", "run/oof/report.md"):
        assert (root / name).read_bytes() == (reference.final / name).read_bytes(), f"{where}: {name} differs"
    leftovers = [str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp")
                 or p.name == ".synth_incomplete"]
    assert not leftovers, f"{where}: left behind {leftovers}"
    got = outcome(root)
    differ = sorted(k for k in set(got) | set(reference.outcome) if got.get(k) != reference.outcome.get(k))
    assert not differ, f"{where}: these differ from the uninterrupted run: {differ}"


# ---------------------------------------------------------------- the uninterrupted run


@dataclass
class Reference:
    work: Workdir
    snapshots: dict      # stage -> copy of the work folder after that stage ("" -> before the first)
    writes: dict         # stage -> the paths of its atomic writes, in order
    train_lines: list    # (seconds since start, stdout line) of the train stage
    outcome: dict

    @property
    def final(self) -> Path:
        return self.snapshots[CHAIN[-1]]

    def before(self, stage: str) -> Path:
        index = CHAIN.index(stage)
        return self.snapshots[CHAIN[index - 1] if index else ""]

    def restore(self, snapshot: Path) -> None:
        shutil.rmtree(self.work.root, ignore_errors=True)
        shutil.copytree(snapshot, self.work.root, symlinks=True)  # copy2: mtimes kept, so cache keys hold


def _timed_lines(process: subprocess.Popen) -> list:
    started, lines = time.time(), []
    for line in process.stdout:
        lines.append((time.time() - started, line.rstrip("\n")))
    return lines


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    base = tmp_path_factory.mktemp("faults")
    work = Workdir(base / "work", base / "logs")
    snapshots, writes = {"": base / "snapshots" / "start"}, {}
    work.root.mkdir()
    snapshots[""].mkdir(parents=True)
    train_lines = []
    for stage in CHAIN:
        trace = base / f"writes-{stage}.txt"
        trace.touch()
        if stage == "train":  # timed, line by line: mid-epoch kills are drawn between its progress lines
            process, log = work.popen(stage, MASKFOLD_TRACE_WRITES=str(trace))
            train_lines = _timed_lines(process)
            assert process.wait(timeout=STAGE_TIMEOUT) == 0, _tail(log)
        else:
            work.must_run(stage, "the uninterrupted run", MASKFOLD_TRACE_WRITES=str(trace))
        writes[stage] = trace.read_text().splitlines()
        snapshots[stage] = base / "snapshots" / stage
        shutil.copytree(work.root, snapshots[stage], symlinks=True)
    return Reference(work, snapshots, writes, train_lines, outcome(snapshots[CHAIN[-1]]))


# ---------------------------------------------------------------- kill points


@dataclass(frozen=True)
class AtWrite:
    """SIGKILL at the n-th atomic write whose path contains `part` (n drawn among the reference run's writes)."""
    stage: str
    part: str
    moment: str  # during | before | after
    what: str
    n: int | None = None  # a fixed occurrence instead of a drawn one

    def kill(self, reference: Reference, rng: random.Random) -> str:
        count = sum(self.part in path for path in reference.writes[self.stage])
        assert count, f"{self.stage} never writes a path containing {self.part!r}"
        n = self.n or rng.randint(1, count)
        status, log = reference.work.run(self.stage, MASKFOLD_KILL_AT=f"{self.part}:{n}:{self.moment}")
        moment = {"during": "killed half-way through it", "before": "killed before its rename",
                  "after": "killed after its rename"}[self.moment]
        where = f"{self.stage}: {self.what} (write {n} of {count} matching {self.part!r}, {moment})"
        assert status == -signal.SIGKILL, f"{where}: never reached, exit {status}:\n{_tail(log)}"
        return where


@dataclass(frozen=True)
class InEpoch:
    """SIGKILL the train stage's session at a time drawn between two of its progress lines (inside an epoch)."""
    stage: str = "train"
    what: str = "mid-epoch"

    def kill(self, reference: Reference, rng: random.Random) -> str:
        lines = [(seconds, line.split(":", 1)[0]) for seconds, line in reference.train_lines]  # less timings
        marks = [i for i, (_, line) in enumerate(lines[:-1]) if re.search(r" epoch \d+$|^\[train\] job ", line)]
        index = rng.choice(marks[:-1])  # never the last epoch's line: the stage must still be running
        start, after = lines[index][1], lines[index + 1][0] - lines[index][0]
        delay = rng.uniform(0.1, 0.9) * after
        process, log = reference.work.popen("train")
        try:
            for line in process.stdout:
                if line.split(":", 1)[0] == start:
                    break
            time.sleep(delay)
            alive = process.poll() is None
            _kill_session(process)
            process.wait(timeout=STAGE_TIMEOUT)
        finally:
            _kill_session(process)
        where = f"train: {delay:.2f}s after {start!r}"
        assert alive, f"{where}: the stage had already ended:\n{_tail(log)}"
        return where


@dataclass(frozen=True)
class WhenWorkersStart:
    """SIGKILL check (only the stage process) as soon as its decode workers are up; they must follow it in seconds."""
    stage: str = "check"
    what: str = "decoding, with 2 workers"

    def kill(self, reference: Reference, rng: random.Random) -> str:
        process, log = reference.work.popen(self.stage, "data.num_workers=2", read_lines=False)
        try:
            workers, deadline = [], time.time() + 60
            while not workers and process.poll() is None and time.time() < deadline:
                workers = _loky_workers(process.pid)
                time.sleep(0.01)
            assert workers, f"check ended (exit {process.poll()}) before its workers started:\n{_tail(log)}"
            survivors = _children(process.pid)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=STAGE_TIMEOUT)
            left = _gone_within(survivors, 5)
        finally:
            _kill_session(process)
        assert not left, f"check's children {left} outlived it by 5 s"
        return f"check: killed as its {len(workers)} decode workers started; they exited with it"


def _points() -> dict[str, object]:
    return {
        "synth-image-torn": AtWrite("synth", "/train/images/", "during", "half of an image written"),
        "synth-eval-image": AtWrite("synth", "/eval/images/", "after", "an eval image in place"),
        "synth-before-stamp": AtWrite("synth", "synth.json", "before", "every file written, the stamp not renamed"),
        "check-decode": WhenWorkersStart(),
        "check-report-torn": AtWrite("check", "check/report.json", "during", "half of its report written"),
        "folds-csv-no-stamp": AtWrite("folds", "-seed42.csv", "after", "the folds file in place, not its stamp"),
        "folds-stamp-torn": AtWrite("folds", "-seed42.json", "during", "half of the folds stamp written"),
        "train-cache-torn": AtWrite("train", "/cache/", "during", "half of the pixel cache written"),
        "train-mid-epoch": InEpoch(),
        "train-after-best": AtWrite("train", "best.pt", "after", "best.pt in place, not val_probs.npz"),
        "train-after-val-probs": AtWrite("train", "/val_probs.npz", "after", "val_probs.npz in place, not last.pt"),
        "train-last-torn": AtWrite("train", "last.pt", "during", "half of last.pt written"),
        "train-after-last": AtWrite("train", "last.pt", "after", "last.pt in place, not metrics.jsonl"),
        "train-before-done": AtWrite("train", "/done.json", "before", "a finished job's stamp not renamed"),
        "train-provenance": AtWrite("train", "meta.json", "after", "a job's provenance written, nothing trained"),
        "oof-between-files": AtWrite("oof", "/oof/", "after", "some of its report files in place"),
        "infer-between-folds": AtWrite("infer", "/done.json", "after", "a fold's tables sealed, the next not begun",
                                       n=1),
        "infer-between-tables": AtWrite("infer", "val_probs_tta.npz", "after", "one of a fold's two tables in place"),
        "infer-eval-cache": AtWrite("infer", "/cache/", "before", "the eval pixel cache written, not renamed"),
        "ensemble-between-files": AtWrite("ensemble", "submission.csv", "after", "submission.csv, not ensemble.json"),
        "ensemble-report-torn": AtWrite("ensemble", "ensemble.json", "during", "half of ensemble.json written"),
        "ensemble-before-stamp": AtWrite("ensemble", "ensemble.done.json", "before", "its files, not its stamp"),
        "pseudo-table-torn": AtWrite("pseudo", "pseudo.csv", "during", "half of pseudo.csv written"),
        "pseudo-before-stamp": AtWrite("pseudo", "done.json", "before", "its table and report, not its stamp"),
        "export-graph-torn": AtWrite("export", "ensemble.onnx", "during", "half of the bundle's graph written"),
        "export-before-manifest": AtWrite("export", "bundle.json", "before", "the graph and nets, not the manifest"),
        "export-before-switch": AtWrite("export", "done.json", "after", "the new version sealed, the link not switched"),
        "predict-table-torn": AtWrite("predict", "predictions.csv", "during", "half of predictions.csv written"),
        "predict-before-record": AtWrite("predict", "predict.json", "before", "its table, not its record"),
    }


POINTS = _points()
FAST = ("synth-image-torn", "check-decode", "folds-csv-no-stamp", "train-mid-epoch", "oof-between-files",
        "infer-between-folds", "ensemble-between-files")


def test_every_kill_point_names_a_stage_of_the_chain_and_every_stage_has_points():
    assert {point.stage for point in POINTS.values()} == set(CHAIN)
    assert [POINTS[name].stage for name in FAST] == list(COMPETITION)  # the fast variant kills each of these once
    assert len(POINTS) >= 12


def test_one_kill_in_every_stage_of_one_chain_gives_the_uninterrupted_answer(reference):
    """The fast variant: one chain, each stage killed once at a drawn point, run again, then the next stage."""
    rng = random.Random(SEED)
    reference.restore(reference.snapshots[""])
    done = []
    for name in FAST:
        point = POINTS[name]
        done.append(point.kill(reference, rng))
        reference.work.must_run(point.stage, f"after {done[-1]}")
    for stage in CHAIN[len(COMPETITION):]:  # pseudo, export and predict: killed in the full run only
        reference.work.must_run(stage, "after the competition's chain")
    assert_same_outcome(reference.work.root, reference, f"seed {SEED}, kills: {done}")


@pytest.mark.faults
@pytest.mark.skipif(not FULL, reason="the full kill-anywhere run: ./run.sh test-faults (MASKFOLD_FULL_FAULTS=1)")
@pytest.mark.parametrize("name", list(POINTS))
def test_a_kill_at_this_point_then_a_rerun_gives_the_uninterrupted_answer(reference, name):
    """From the uninterrupted run as it was before the stage: kill it at the point, run it and the rest again."""
    point = POINTS[name]
    rng = random.Random(f"{SEED}-{name}")
    reference.restore(reference.before(point.stage))
    where = point.kill(reference, rng)
    for stage in CHAIN[CHAIN.index(point.stage):]:
        reference.work.must_run(stage, f"after {where}")
    assert_same_outcome(reference.work.root, reference, f"seed {SEED}, {where}")


# ---------------------------------------------------------------- what a kill leaves: temp files and workers


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
            "while True:\n    decode_images(files, {'mode': 'box', 'box': [0, 0, 1, 1]}, [32, 40], 10**8, workers=2)\n")
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
    one, _ = decode_images(files, {"mode": "box", "box": [0, 0, 1, 1]}, [16, 20], 10**8, workers=1)
    two, _ = decode_images(files, {"mode": "box", "box": [0, 0, 1, 1]}, [16, 20], 10**8, workers=2)
    assert (one == two).all()
