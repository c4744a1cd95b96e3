"""tune stage: run trials of the Optuna study (pipeline.study) until `tune.trials` have finished across
all workers, then write the best values back as a loadable config, <output.dir>/tune/best.yaml.
More workers are the same command started again (PostgreSQL storage for many machines)."""
from __future__ import annotations

import optuna

from pipeline.errors import MaskfoldError
from pipeline.io import redacted
from pipeline.stages import stage_main
from pipeline.study import load_study, objective_for, write_best

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def run(cfg: dict, force: bool = False) -> dict:
    from pipeline.data.dataset import load_train_data

    t = cfg["tune"]
    study = load_study(cfg)
    data = load_train_data(cfg)
    done = sum(trial.state in FINISHED for trial in study.trials)
    print(f"[tune] study '{t['study']}' in {redacted(t['storage'])}: {done} of {t['trials']} trials finished")
    if done < t["trials"]:
        # MaxTrialsCallback counts every worker's trials, so N workers together stop at tune.trials.
        # Only expected errors fail a trial quietly; a bug stops the study with its traceback.
        study.optimize(objective_for(cfg, data), n_trials=t["trials"] - done,
                       callbacks=[optuna.study.MaxTrialsCallback(t["trials"], states=FINISHED)],
                       catch=(MaskfoldError,))
    path = write_best(cfg, study)
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    pruned = sum(trial.state == optuna.trial.TrialState.PRUNED for trial in study.trials)
    if path:
        print(f"[tune] {len(complete)} complete, {pruned} pruned; best trial {study.best_trial.number}: "
              f"val macro F1 {study.best_value:.4f} with {study.best_params}; config: {path}")
    return {"best_config": str(path) if path else None, "complete": len(complete), "pruned": pruned}


if __name__ == "__main__":
    stage_main(run, "tune")
