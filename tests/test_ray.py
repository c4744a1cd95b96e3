"""The Ray runner (`runner.mode: ray`): (backbone, fold) jobs as Ray tasks end exactly as the local runner's, a
killed worker's job is retried and resumes from last.pt, a machine that cannot see the data refuses the job, and
tune runs its trials in Ray workers on one Optuna storage. One local Ray (this machine's CPUs, 2 here) serves
the whole module: starting Ray takes seconds."""
import json
import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import optuna
import pytest
import torch

from pipeline import runner
from pipeline import study as study_lib
from pipeline.config import load_config, with_values
from pipeline.errors import ConfigError, DataError, MaskfoldError
from pipeline.io import load_npz
from pipeline.stages import folds, infer, oof, train, tune
from pipeline.train.loop import train_job
from pipeline.data.dataset import load_train_data
from tests.conftest import make_config
from tests.test_faults import _normalised

# two jobs (2 folds of one backbone), one torch thread each: Ray runs both at once on 2 CPUs
TINY = ["data.image_size=[32,40]", "folds.k=2", "model.backbones=[mobilenetv3_small_050]", "train.epochs=6",
        "train.patience=10", "train.batch_size=16", "train.threads=1", "augment.train=[{name: HorizontalFlip, p: 0.5}]"]
ON_RAY = ["runner.mode=ray", "runner.cpus_per_job=1"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = runner.connect(load_config("configs/demo.yaml", ON_RAY))
    yield ray
    ray.shutdown()


def run_train(tmp, data, *overrides):
    cfg = make_config(tmp, data, *TINY, *overrides)
    folds.run(cfg)
    summaries = train.run(cfg)
    oof.run(cfg)
    return summaries


@pytest.fixture(scope="module")
def local_run(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    run_train(tmp, tiny_data)
    infer.run(make_config(tmp, tiny_data, *TINY))
    return tmp / "run"


def job_outputs(run) -> dict:
    """What each job folder holds that must not depend on the runner: checkpoint tensors, validation tables,
    metrics and stamps, less timings. Left out: config.yaml (it records runner.* and output.dir, which differ
    by design), TensorBoard files (wall times) and locks."""
    outputs = {}
    for path in sorted((run / "train").rglob("*")):
        name = str(path.relative_to(run))
        if path.suffix == ".pt":
            outputs[name] = _normalised(torch.load(path, map_location="cpu", weights_only=True))
        elif path.suffix == ".npz":
            outputs[name] = {key: value.tobytes() for key, value in load_npz(path).items()}
        elif path.name == "metrics.jsonl":
            outputs[name] = [_normalised(json.loads(line)) for line in path.read_text().splitlines()]
        elif path.name in ("done.json", "meta.json"):
            outputs[name] = _normalised(json.loads(path.read_text()))
    return outputs


def assert_same_as_local(run, local_run) -> None:
    expected, got = job_outputs(local_run), job_outputs(run)
    assert sorted(got) == sorted(expected) and any(name.endswith("best.pt") for name in got)
    for name in expected:
        assert got[name] == expected[name], f"{name} differs from the local runner's"
    for name in ("report.md", "mobilenetv3_small_050.npz"):
        assert (run / "oof" / name).exists()
    assert (run / "oof" / "report.md").read_text() == (local_run / "oof" / "report.md").read_text()
    report, local_report = (json.loads((r / "oof" / "report.json").read_text()) for r in (run, local_run))
    assert report["backbones"] == local_report["backbones"]
    pooled, local_pooled = (load_npz(r / "oof" / "mobilenetv3_small_050.npz") for r in (run, local_run))
    for key in local_pooled:
        np.testing.assert_array_equal(pooled[key], local_pooled[key])


def worker_pids(printed: str, stage: str = "train") -> dict[str, int]:
    """{job: pid} from the runner's start lines."""
    return {job: int(pid) for job, pid in re.findall(rf"\[{stage}\] started (.+?) on \S+ \(pid (\d+)\)", printed)}


def test_ray_runs_the_jobs_in_worker_processes_at_once_and_ends_as_the_local_runner(
        ray_cluster, tiny_data, local_run, tmp_path, capsys):
    run_train(tmp_path, tiny_data, *ON_RAY)
    printed = capsys.readouterr().out
    pids = worker_pids(printed)
    assert sorted(pids) == ["mobilenetv3_small_050 fold 0", "mobilenetv3_small_050 fold 1"]
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()  # two Ray workers, not this process
    assert printed.count("[train] finished mobilenetv3_small_050 fold") == 2
    assert_same_as_local(tmp_path / "run", local_run)


def test_infer_on_ray_writes_the_local_runners_tables(ray_cluster, tiny_data, local_run, tmp_path, capsys):
    shutil.copytree(local_run / "train", tmp_path / "run" / "train")  # the same checkpoints
    cfg = make_config(tmp_path, tiny_data, *TINY, *ON_RAY)
    folds.run(cfg)
    infer.run(cfg)
    assert len(worker_pids(capsys.readouterr().out, "infer")) == 2
    tables = sorted((local_run / "infer").rglob("*.npz"))
    assert len(tables) == 4
    for table in tables:
        got = load_npz(tmp_path / "run" / table.relative_to(local_run))
        for key, value in load_npz(table).items():
            np.testing.assert_array_equal(got[key], value)


def test_ray_jobs_run_at_the_priority_of_the_local_runner(ray_cluster):
    # Ray's default niceness (15) would leave a job only what other processes of the machine do not take
    assert ray_cluster.get(ray_cluster.remote(lambda: os.nice(0)).remote()) == os.nice(0)


def kill_the_job_once(folder, seen: dict) -> None:
    """SIGKILL the process that holds the job folder's lock (a Ray worker) once it has saved an epoch and is not
    done; then note how many epochs the first metrics.jsonl written after the kill holds (1 if it started over)."""
    lock, metrics, deadline = folder.parent / f".{folder.name}.lock", folder / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and "pid" not in seen and not (folder / "done.json").exists():
        holder = re.match(r"process (\d+) ", lock.read_text()) if lock.exists() else None
        if holder and (folder / "last.pt").exists() and not (folder / "done.json").exists():
            before = metrics.read_text() if metrics.exists() else ""
            os.kill(int(holder[1]), signal.SIGKILL)
            seen.update(pid=int(holder[1]), done_at_kill=(folder / "done.json").exists())
        time.sleep(0.01)
    while time.time() < deadline and "pid" in seen and "epochs_after" not in seen:
        after = metrics.read_text() if metrics.exists() else ""
        if after != before and after.endswith("\n"):
            seen["epochs_after"] = len(after.splitlines())
        time.sleep(0.01)


def test_a_killed_worker_is_retried_and_its_job_resumes_to_the_uninterrupted_result(
        ray_cluster, tiny_data, local_run, tmp_path, capsys):
    folder = tmp_path / "run" / "train" / "mobilenetv3_small_050" / "fold0"
    seen = {}
    killer = threading.Thread(target=kill_the_job_once, args=(folder, seen), daemon=True)
    killer.start()
    run_train(tmp_path, tiny_data, *ON_RAY)
    killer.join(timeout=5)
    assert "pid" in seen and not seen["done_at_kill"], "the job finished before its worker could be killed"
    assert seen["pid"] != os.getpid() and seen["pid"] in worker_pids(capsys.readouterr().out).values()
    # Ray ran it again; the retry took the dead worker's lock and went on from last.pt, not from epoch 0
    assert seen["epochs_after"] >= 2
    assert_same_as_local(tmp_path / "run", local_run)


def test_a_job_on_a_machine_that_cannot_see_the_data_refuses_to_start_naming_the_path(
        ray_cluster, tiny_data, tmp_path):
    cfg = make_config(tmp_path, tiny_data, *TINY, *ON_RAY)
    folds.run(cfg)
    load_train_data(cfg)  # the cache, as the stage makes it before its jobs
    elsewhere = make_config(tmp_path, tmp_path / "not-mounted", *TINY, *ON_RAY)
    with pytest.raises(MaskfoldError, match=r"cannot see data\.root \S*not-mounted; .*same paths"):
        runner.run_jobs(elsewhere, "train", {"mobilenetv3_small_050 fold 0": ("mobilenetv3_small_050", 0)},
                        train_job, load_train_data)
    # an output.dir this machine has a folder of its own at: the run's marker file is not in it
    (tmp_path / "run").mkdir(exist_ok=True)
    with pytest.raises(MaskfoldError, match=r"cannot see output\.dir \S*run of the run"):
        runner.require_visible(cfg, tmp_path / "run" / ".runner-0123456789ab")


def test_an_expected_error_in_a_ray_job_reaches_the_driver_as_itself(ray_cluster, data_copy, tmp_path):
    cfg = make_config(tmp_path, data_copy, *TINY, *ON_RAY)
    folds.run(cfg)
    load_train_data(cfg)
    lost = next((data_copy / "train" / "images").glob("*/mask1.*"))
    lost.unlink()  # after the driver's checks: only the job finds out
    with pytest.raises(DataError) as error:
        runner.run_jobs(cfg, "train", {"mobilenetv3_small_050 fold 0": ("mobilenetv3_small_050", 0)},
                        train_job, load_train_data)
    assert len(error.value.problems) == 1 and lost.parent.name in error.value.problems[0]
    assert str(error.value).startswith("1 data problem(s):\n  - ") and lost.parent.name in str(error.value)


@pytest.mark.parametrize("override, message", [
    ("runner.mode=rey", r"runner\.mode = 'rey': must be one of local, ray"),
    ("runner.address=ray://head:10001", r"runner\.address = 'ray://head:10001': must be null .*not ray://"),
    ("runner.cpus_per_job=0", r"runner\.cpus_per_job = 0: must be null \(train\.threads"),
    ("runner.gpus_per_job=2", r"runner\.gpus_per_job = 2: must be a number in \(0, 1\]"),
])
def test_runner_values_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/demo.yaml", [override])


def test_jobs_no_machine_of_the_cluster_can_take_are_refused_before_any_starts(ray_cluster):
    most = int(ray_cluster.cluster_resources()["CPU"])
    with pytest.raises(ConfigError, match=rf"runner\.cpus_per_job: a job asks for {most + 1} CPUs but no machine"):
        runner.job_resources(load_config("configs/demo.yaml", [*ON_RAY, f"runner.cpus_per_job={most + 1}"]))
    if not ray_cluster.cluster_resources().get("GPU"):
        with pytest.raises(ConfigError, match=r"train\.device is 'cuda' but no machine of the Ray cluster has a GPU"):
            runner.job_resources(load_config("configs/demo.yaml", [*ON_RAY, "train.device=cuda"]))


def test_tune_refuses_one_sqlite_file_for_workers_on_several_machines(tmp_path):
    cfg = load_config("configs/demo.yaml", [f"tune.storage=sqlite:///{tmp_path}/optuna.db"])
    study_lib.require_shared_storage(cfg, machines=1)
    with pytest.raises(ConfigError, match=r"tune\.storage sqlite:///.*workers on 3 machines .* postgresql://"):
        study_lib.require_shared_storage(cfg, machines=3)
    study_lib.require_shared_storage(with_values(cfg, {"tune.storage": f"journal:{tmp_path}/j.log"}), machines=3)


def test_tune_runs_its_trials_in_ray_workers_on_one_storage(ray_cluster, tiny_data, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cfg = make_config(tmp_path, tiny_data, "data.image_size=[32,40]", "folds.k=3", "model.backbones=[mobilenetv3_small_050]",
                      "train.batch_size=16", "train.threads=1", "tune.epochs=2", "tune.folds=[0]", "tune.trials=2",
                      "tune.pruner=none", f"tune.storage={storage}", *ON_RAY)
    folds.run(cfg)
    result = tune.run(cfg)
    pids = worker_pids(capsys.readouterr().out, "tune")
    assert sorted(pids) == ["trial worker 1", "trial worker 2"]  # one per CPU slot, up to the trials left
    study = optuna.load_study(study_name="demo", storage=storage)
    # each worker stops once tune.trials have finished across both: at most one trial more than asked
    assert 2 <= result["complete"] <= 3 and result["best_config"]
    ran_in = {int(trial.user_attrs["worker"].split(" pid ")[1]) for trial in study.trials}
    assert ran_in <= set(pids.values()) and os.getpid() not in ran_in
