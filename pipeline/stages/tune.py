"""tune stage: run trials of the Optuna study (pipeline.study) until `tune.trials` have finished across
all workers, then write the best values back as a loadable config, <output.dir>/tune/best.yaml.
More workers are the same command started again (PostgreSQL storage for many machines), or, with
`runner.mode: ray`, one worker per GPU (or CPU slot) of the Ray cluster, all on the same storage."""
from __future__ import annotations

import optuna

from pipeline.io import redacted
from pipeline.runner import job_slots, machines, run_jobs
from pipeline.stages import stage_main
from pipeline.study import finished_trials, load_study, require_shared_storage, run_trials, write_best


def run(cfg: dict, force: bool = False) -> dict:
    from pipeline.data.dataset import load_train_data

    t = cfg["tune"]
    study = load_study(cfg)
    data = load_train_data(cfg)
    done = finished_trials(study)
    print(f"[tune] study '{t['study']}' in {redacted(t['storage'])}: {done} of {t['trials']} trials finished")
    if done < t["trials"]:
        require_shared_storage(cfg, machines(cfg))
        workers = min(job_slots(cfg), t["trials"] - done)
        run_jobs(cfg, "tune", {f"trial worker {n}": (n,) for n in range(1, workers + 1)}, run_trials, load_train_data,
                 context=data)
    path = write_best(cfg, study)
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    pruned = sum(trial.state == optuna.trial.TrialState.PRUNED for trial in study.trials)
    if path:
        print(f"[tune] {len(complete)} complete, {pruned} pruned; best trial {study.best_trial.number}: "
              f"val macro F1 {study.best_value:.4f} with {study.best_params}; config: {path}")
    return {"best_config": str(path) if path else None, "complete": len(complete), "pruned": pruned}


if __name__ == "__main__":
    stage_main(run, "tune")
