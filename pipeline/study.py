"""The Optuna study over config values: storage, sampler and pruner, the objective, the best config.

Each trial trains `tune.folds` for `tune.epochs`.

Storage from `tune.storage`: `sqlite:///FILE` (default), `journal:FILE`, or `postgresql://...` for
many workers on many machines (start the same command on each). RDB storages keep a heartbeat: a
worker killed mid-trial is declared dead after `tune.grace_s`, its trial marked FAIL and re-run
(RetryFailedTrialCallback), so no trial is lost. Each epoch reports val macro F1 to Optuna and the
median pruner stops hopeless trials. The best values are written back as a loadable config:
<output.dir>/tune/best.yaml. Watch the study with `./run.sh dashboard -c CONFIG`.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import optuna
from sqlalchemy.exc import SQLAlchemyError

from pipeline.artifacts import output_dir
from pipeline.config import with_values
from pipeline.errors import ConfigError, MaskfoldError
from pipeline.io import atomic_write_json, atomic_write_text, git_commit, redacted, yaml_text

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def storage_url(cfg: dict) -> str:
    """`tune.storage`, or the URL in the environment variable it names as `env:NAME` (keeps a password
    out of config files)."""
    url = str(cfg["tune"]["storage"])
    if url.startswith("env:"):
        name = url.removeprefix("env:")
        if not os.environ.get(name):
            raise ConfigError(f"tune.storage is {url!r} but the environment variable {name} is not set")
        url = os.environ[name]
    return url


def make_storage(cfg: dict):
    """The study's storage object, from `tune.storage`."""
    t = cfg["tune"]
    url = storage_url(cfg)
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif not url.startswith(("postgresql", "mysql")):
        raise ConfigError(f"tune.storage {url!r}: use sqlite:///FILE, journal:FILE or postgresql://...")
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=t["heartbeat_s"], grace_period=t["grace_s"],
                heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=t["max_retry"]),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        except SQLAlchemyError as error:
            # workers started together race to create the schema; the loser finds it made
            if attempt == 2:
                raise storage_error(url, error) from error
            time.sleep(1 + attempt)


def storage_error(url: str, error: Exception) -> MaskfoldError:
    """One line naming the storage (password masked), the database's own words and what to check."""
    cause = getattr(error, "orig", None) or error  # the driver's error, without SQLAlchemy's background link
    words = " ".join(line.strip() for line in str(cause).strip().splitlines() if line.strip())
    return MaskfoldError(f"tune.storage {redacted(url)}: cannot open the study storage ({redacted(words)[:300]}); "
                         f"check that the database server is running and reachable at that host and port, that "
                         f"the database exists, and the user and password")


def require_shared_storage(cfg: dict, machines: int) -> None:
    """Workers on several machines need a storage they all reach safely: not one SQLite file."""
    if machines > 1 and storage_url(cfg).startswith("sqlite"):
        raise ConfigError(f"tune.storage {redacted(storage_url(cfg))}: workers on {machines} machines cannot share one "
                          f"SQLite file (its locks do not hold on network filesystems); use postgresql://... "
                          f"(or journal:FILE on the shared filesystem)")


def finished_trials(study: optuna.Study) -> int:
    return sum(trial.state in FINISHED for trial in study.trials)


def load_study(cfg: dict) -> optuna.Study:
    t = cfg["tune"]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if t["pruner"] == "median" \
        else optuna.pruners.NopPruner()
    storage = make_storage(cfg)
    for attempt in range(3):
        try:
            return optuna.create_study(study_name=t["study"], storage=storage, direction="maximize",
                                       sampler=optuna.samplers.TPESampler(seed=t["seed"]), pruner=pruner,
                                       load_if_exists=True)
        except SQLAlchemyError as error:
            # workers started together race to create the study; the loser finds it made
            if attempt == 2:
                raise storage_error(storage_url(cfg), error) from error
            time.sleep(1 + attempt)


def suggest(trial: optuna.Trial, space: list[dict]) -> dict:
    values = {}
    for spec in space:
        kind, name = spec.get("type"), spec.get("param")
        # every entry was checked when the config loaded (schema.SPACE_TYPES owns the types)
        if kind == "float":
            values[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif kind == "int":
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            values[name] = trial.suggest_categorical(name, spec["choices"])
    return values


def trial_config(cfg: dict, values: dict, trial_number: int) -> dict:
    t = cfg["tune"]
    fixed = {"train.epochs": t["epochs"], "train.folds": list(t["folds"]),
             "output.dir": str(output_dir(cfg, "tune", f"trial{trial_number:04d}"))}
    return with_values(with_values(cfg, values, "tune.space"), fixed, "tune")


def objective_for(cfg: dict, data):
    from pipeline.train.loop import train_job  # torch loads only where trials run, not for the dashboard

    t = cfg["tune"]
    backbone = t["backbone"] or cfg["model"]["backbones"][0]

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", f"{socket.gethostname()} pid {os.getpid()}")  # where it ran (Ray: any machine)
        values = suggest(trial, t["space"])
        trial_cfg = trial_config(cfg, values, trial.number)
        scores, step = [], 0

        def report(epoch: int, record: dict) -> None:
            nonlocal step
            # one step per epoch across the trial's folds; prune on the running value
            trial.report(record["val_f1"], step)
            step += 1
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at fold {fold} epoch {epoch} (val F1 {record['val_f1']:.4f})")

        for fold in t["folds"]:
            summary = train_job(trial_cfg, backbone, int(fold), data, force=True, epoch_callback=report)
            scores.append(summary["best_f1"])
        return float(sum(scores) / len(scores))

    return objective


def run_trials(cfg: dict, worker: int, data, force: bool = False) -> int:
    """One worker's share of the study: trials until `tune.trials` have finished across all workers, however
    many there are (this process, others started by hand, Ray tasks); returns how many this one ran."""
    t = cfg["tune"]
    study = load_study(cfg)
    done = finished_trials(study)
    if done >= t["trials"]:
        return 0
    before = len(study.trials)
    # MaxTrialsCallback counts every worker's trials, so N workers together stop at tune.trials.
    # Only expected errors fail a trial quietly; a bug stops the study with its traceback.
    study.optimize(objective_for(cfg, data), n_trials=t["trials"] - done,
                   callbacks=[optuna.study.MaxTrialsCallback(t["trials"], states=FINISHED)], catch=(MaskfoldError,))
    return len(study.trials) - before


def write_best(cfg: dict, study: optuna.Study) -> Path | None:
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not finished:
        return None
    best = study.best_trial
    best_cfg = with_values(cfg, best.params, "best trial")
    best_cfg = {k: v for k, v in best_cfg.items() if k != "name"}
    best_cfg["output"]["dir"] = "runs/{config}"
    folder = output_dir(cfg, "tune")
    path = folder / "best.yaml"
    header = (f"# Best of Optuna study '{cfg['tune']['study']}' (trial {best.number}, mean val macro F1 "
              f"{best.value:.4f} on folds {cfg['tune']['folds']} after {cfg['tune']['epochs']} epochs).\n"
              f"# Use it: ./run.sh train -c {path}   (or every stage: ./run.sh all -c {path})\n")
    atomic_write_text(path, header + yaml_text(redacted(best_cfg)))
    atomic_write_json(folder / "best.json", {"study": cfg["tune"]["study"], "trial": best.number,
                                             "value": best.value, "params": best.params,
                                             "seed": cfg["tune"]["seed"], "git_commit": git_commit()})
    return path
