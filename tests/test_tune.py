"""Optuna tuning: real storages, pruning through the per-epoch callback, crashed workers, the dashboard."""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from pipeline import study as study_lib
from pipeline.stages import STAGE_NAMES, folds, tune
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.io import PROJECT_ROOT
from pipeline.data.dataset import load_train_data
from tests.conftest import make_config

QUICK = ["data.image_size=[32,40]", "folds.k=3", "model.backbones=[mobilenetv3_small_050]", "train.batch_size=16",
         "train.max_batches=2", "tune.epochs=2", "tune.folds=[0]"]


def tune_config(tmp, data, *overrides):
    cfg = make_config(tmp, data, *QUICK, *overrides)
    folds.run(cfg)
    return cfg


def test_a_study_runs_its_trials_and_writes_a_loadable_best_config(tmp_path, tiny_data):
    cfg = tune_config(tmp_path, tiny_data, f"tune.storage=sqlite:///{tmp_path}/optuna.db", "tune.trials=3",
                      "tune.pruner=none")
    result = tune.run(cfg)
    assert result["complete"] == 3
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.trials) == 3
    best = load_config(result["best_config"])
    header = [line for line in open(result["best_config"]) if line.startswith("# Use it:")][0]
    stage = header.split("./run.sh ", 1)[1].split()[0]
    assert stage in STAGE_NAMES  # the command it tells the user names a stage that exists
    # and it runs: the printed command as it is, one short job (the overrides only shorten it)
    command = shlex.split(header.removeprefix("# Use it: ").split("   (")[0])
    subprocess.run([*command, f"output.dir={tmp_path / 'best'}", "train.folds=[0]", "train.epochs=1"],
                   cwd=PROJECT_ROOT, check=True, stdout=subprocess.DEVNULL)
    assert (tmp_path / "best" / "train" / "mobilenetv3_small_050" / "fold0" / "done.json").exists()
    for key, value in study.best_params.items():
        section, name = key.split(".")
        assert best[section][name] == value
    # a second call finds the study finished and runs nothing more
    assert tune.run(cfg)["complete"] == 3


def test_a_journal_file_storage_works_too(tmp_path, tiny_data):
    cfg = tune_config(tmp_path, tiny_data, f"tune.storage=journal:{tmp_path}/journal.log", "tune.trials=1")
    assert tune.run(cfg)["complete"] == 1
    assert (tmp_path / "journal.log").stat().st_size > 0


def test_the_pruner_stops_a_trial_on_the_val_f1_each_epoch_reports(tmp_path, tiny_data):
    """Three trials of the same values: unpruned, it reports each epoch's val F1 and returns the best; a pruner
    whose bar is just above the first epoch's F1 stops it after that epoch; one just below lets it finish."""
    cfg = tune_config(tmp_path, tiny_data)
    objective = study_lib.objective_for(cfg, load_train_data(cfg))

    def trial_under(pruner):
        study = optuna.create_study(direction="maximize", pruner=pruner)
        study.enqueue_trial({"train.lr": 0.05, "train.weight_decay": 0.001, "train.loss": "ce"})
        study.optimize(objective, n_trials=1)
        return study.trials[0]

    free = trial_under(optuna.pruners.NopPruner())
    reported = free.intermediate_values
    assert free.state == optuna.trial.TrialState.COMPLETE and sorted(reported) == [0, 1]  # tune.epochs=2, one fold
    assert free.value == max(reported.values())  # the fold's best epoch
    stopped = trial_under(optuna.pruners.ThresholdPruner(lower=reported[0] + 1e-9))
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert stopped.intermediate_values == {0: reported[0]}  # stopped after the first epoch, on its real F1
    kept = trial_under(optuna.pruners.ThresholdPruner(lower=min(reported.values()) - 1e-9))
    assert kept.state == optuna.trial.TrialState.COMPLETE and kept.intermediate_values == reported


def test_a_bad_search_space_entry_is_refused_when_the_config_loads(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match=r"tune.space"):
        tune_config(tmp_path, tiny_data, "tune.space=[{param: train.lr, type: normal}]")


def test_a_killed_worker_loses_no_trial(tmp_path, tiny_data):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    overrides = [*QUICK, f"tune.storage={storage}", "tune.trials=1", "tune.heartbeat_s=1", "tune.grace_s=2",
                 "tune.epochs=30", "train.max_batches=0"]
    tune_config(tmp_path, tiny_data, *overrides)
    command = [sys.executable, "-m", "pipeline.stages.tune", "-c", "configs/demo.yaml", f"data.root={tiny_data}",
               f"output.dir={tmp_path / 'run'}", f"folds.dir={tmp_path / 'folds'}", f"data.cache_dir={tmp_path / 'cache'}",
               f"data.label_fixes={tiny_data / 'label_fixes.csv'}", *overrides]
    worker = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    running = []
    while time.time() < deadline and worker.poll() is None and not running:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="demo", storage=storage)
            running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values]
        except KeyError:
            pass
    os.kill(worker.pid, signal.SIGKILL)  # a worker dies mid-trial
    worker.wait()
    assert running, "the worker never started a trial"
    time.sleep(3)  # past the grace period: its heartbeat is stale

    fast = tune_config(tmp_path, tiny_data, *overrides[:-2])
    tune.run(fast)
    study = optuna.load_study(study_name="demo", storage=storage)
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == running[0].number]
    assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == running[0].params  # the same trial, run again


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_dashboard_serves_the_study_over_http(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="demo", storage=storage, direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipeline.stages.dashboard", "-c", "configs/demo.yaml",
                               f"tune.storage={storage}", "--port", str(port)], cwd=PROJECT_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body, deadline = None, time.time() + 60
        while body is None and time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    body = json.loads(response.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, "dashboard never answered"
        assert [s["study_name"] for s in body["study_summaries"]] == ["demo"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=5) as response:
            assert response.status == 200
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.skipif(not os.environ.get("MASKFOLD_TEST_POSTGRES"),
                    reason="no PostgreSQL server (.ci/run starts one and sets MASKFOLD_TEST_POSTGRES)")
def test_two_workers_share_one_study_on_postgresql(tmp_path, tiny_data):
    import uuid

    storage = os.environ["MASKFOLD_TEST_POSTGRES"]
    study_name = f"test-{uuid.uuid4().hex[:8]}"
    overrides = [*QUICK, f"tune.storage={storage}", f"tune.study={study_name}", "tune.trials=4", "tune.pruner=none"]
    tune_config(tmp_path, tiny_data, *overrides)
    command = [sys.executable, "-m", "pipeline.stages.tune", "-c", "configs/demo.yaml", f"data.root={tiny_data}",
               f"folds.dir={tmp_path / 'folds'}", f"data.cache_dir={tmp_path / 'cache'}",
               f"data.label_fixes={tiny_data / 'label_fixes.csv'}", *overrides]
    workers = [subprocess.Popen([*command, f"output.dir={tmp_path / f'worker{i}'}"], cwd=PROJECT_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    errors = [w.communicate(timeout=300)[1].decode()[-2000:] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(complete) <= 5  # MaxTrialsCallback stops both; one may finish a trial in flight
    optuna.delete_study(study_name=study_name, storage=storage)


def test_no_artifact_holds_the_storage_password(tmp_path, tiny_data, monkeypatch):
    secret = "s3cr3t-pw"
    cfg = make_config(tmp_path, tiny_data, *QUICK, "train.epochs=1", "train.max_batches=1",
                      f"tune.storage=postgresql://user:{secret}@db.example/optuna")
    folds.run(cfg)
    from pipeline.stages import train

    train.run(cfg)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written)
    assert not [p for p in written if secret.encode() in p.read_bytes()]
    assert "postgresql://user:***@db.example/optuna" in (next(p for p in written if p.name == "config.yaml")).read_text()


def test_the_storage_url_can_come_from_an_environment_variable(tmp_path, monkeypatch):
    cfg = load_config("configs/demo.yaml", ["tune.storage=env:MASKFOLD_TEST_STORAGE"])
    with pytest.raises(ConfigError, match="MASKFOLD_TEST_STORAGE is not set"):
        study_lib.make_storage(cfg)
    monkeypatch.setenv("MASKFOLD_TEST_STORAGE", f"sqlite:///{tmp_path}/from-env.db")
    study_lib.make_storage(cfg)
    assert (tmp_path / "from-env.db").exists()
