"""Where a stage's jobs run: one after another in this process, or as Ray tasks across a cluster.

`runner.mode: local` (the default, and the demo's) runs each job here, in order. `runner.mode: ray`
submits every job at once as a Ray task that asks for `runner.gpus_per_job` GPUs when the cluster has
GPUs (else `runner.cpus_per_job` CPUs), to the cluster at `runner.address` or to a Ray started on this
machine. Ray places the tasks (all GPUs of a machine at once) and re-runs a task whose worker process or
machine died (`runner.max_retries`); a training job then resumes from its last.pt, and the job-folder
lock (flock: the kernel drops it with its dead holder) keeps two attempts from writing one folder.

A job is `work(cfg, *args, context, force=force)`; `prepare(cfg)` makes the context that every job of
one process shares (the decoded data, ...). A Ray task makes its own, on whichever machine it lands,
from the paths in the config: those must be shared (README, "Many GPUs and machines"), and a task that
cannot see one refuses to start, naming it.

Ray is imported here only, and only for `runner.mode: ray`: local runs do not pay for it.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from pipeline.artifacts import output_dir
from pipeline.data.folds import folds_path
from pipeline.errors import ConfigError, MaskfoldError
from pipeline.io import atomic_write_text, stable_hash


def run_jobs(cfg: dict, stage: str, jobs: dict[str, tuple], work, prepare, context=None, force: bool = False) -> list:
    """`work(cfg, *args, context, force=force)` for every job {name: args}; the results in job order.

    The local runner uses `context` when the caller already made it, else `prepare(cfg)`; Ray tasks
    always prepare their own. `work` and `prepare` must be importable functions (Ray sends them by name).
    """
    if cfg["runner"]["mode"] == "ray":
        return _run_on_ray(cfg, stage, jobs, work, prepare, force)
    context = prepare(cfg) if context is None else context
    results = []
    for number, (name, args) in enumerate(jobs.items(), start=1):
        print(f"[{stage}] job {number}/{len(jobs)}: {name}")
        results.append(work(cfg, *args, context, force=force))
    return results


def job_slots(cfg: dict) -> int:
    """How many jobs run at once: 1 here; on Ray, as many as the cluster's machines fit."""
    if cfg["runner"]["mode"] != "ray":
        return 1
    ray = connect(cfg)
    resources, _ = job_resources(cfg)
    slots = 0
    for node in _alive_nodes(ray):
        fits = [int(node.get("CPU", 0) // resources["num_cpus"])]
        if "num_gpus" in resources:
            fits.append(int(node.get("GPU", 0) // resources["num_gpus"]))
        slots += min(fits)
    return slots


def machines(cfg: dict) -> int:
    """Machines the jobs may land on: 1 here; on Ray, the cluster's live nodes."""
    if cfg["runner"]["mode"] != "ray":
        return 1
    return len(_alive_nodes(connect(cfg)))


# ---------------------------------------------------------------- Ray: the driver side

def _import_ray():
    # Ray merges log lines of different workers that differ only in numbers ("fold 0" and "fold 1"
    # epochs would print as one line); it reads this when first imported.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    return ray


def connect(cfg: dict):
    """Ray, joined to the cluster at `runner.address` or started on this machine; once per process."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    address = cfg["runner"]["address"]
    try:
        if address is None:
            # Ray starts its workers at niceness 15: beside any other process, a job would get the leftovers
            os.environ.setdefault("RAY_worker_niceness", "0")
            # "local": a Ray of this run's own, even when another runs on this machine
            ray.init(address="local", include_dashboard=False)
        else:
            ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"runner.address {address}: cannot join a Ray cluster there "
                          f"({str(error).strip().splitlines()[0][:200]})") from error
    return ray


def _alive_nodes(ray) -> list[dict]:
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def job_resources(cfg: dict) -> tuple[dict, int | None]:
    """(the Ray resources one job asks for, its torch threads): GPUs when the cluster has them and
    train.device allows, else CPUs, whose count is then also the job's torch threads."""
    ray = _import_ray()
    runner, device = cfg["runner"], cfg["train"]["device"]
    cpus = runner["cpus_per_job"] or cfg["train"]["threads"] or 1
    nodes = _alive_nodes(ray)
    on_gpus = device != "cpu" and any(node.get("GPU", 0) > 0 for node in nodes)
    if device == "cuda" and not on_gpus:
        raise ConfigError("train.device is 'cuda' but no machine of the Ray cluster has a GPU")
    wanted = {"num_cpus": cpus, **({"num_gpus": runner["gpus_per_job"]} if on_gpus else {})}
    fits = [node for node in nodes if node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= wanted.get("num_gpus", 0)]
    if not fits:
        largest = max((node.get("CPU", 0) for node in nodes), default=0)
        raise ConfigError(f"runner.cpus_per_job: a job asks for {cpus} CPUs{' and a GPU' if on_gpus else ''} "
                          f"but no machine of the Ray cluster has that (most CPUs on one: {largest:g})")
    return wanted, (None if on_gpus else cpus)


UNITS = {"num_cpus": "CPU", "num_gpus": "GPU"}


def _run_on_ray(cfg: dict, stage: str, jobs: dict[str, tuple], work, prepare, force: bool) -> list:
    from pipeline.progress import progress

    ray = connect(cfg)
    resources, threads = job_resources(cfg)
    if threads:
        # build_job sets torch's threads from train.threads: make it the CPUs Ray gave the job
        cfg = {**cfg, "train": {**cfg["train"], "threads": threads}}
    marker = _shared_marker(cfg)
    # resources in ray.remote itself, not .options(): there, num_gpus also gives each GPU job a fresh worker
    # process (Ray's max_calls=1), so no job inherits another's GPU memory or CUDA device
    task = ray.remote(max_retries=cfg["runner"]["max_retries"], retry_exceptions=False,  # a job's error is no crash
                      runtime_env={"env_vars": {"TQDM_DISABLE": "1"}},  # per-epoch bars would flood the driver's log
                      **resources)(_ray_job)
    names = {task.options(name=f"{stage} {name}").remote(cfg, work, prepare, args, force, os.getcwd(), str(marker)): name
             for name, args in jobs.items()}
    where = "a Ray started on this machine" if cfg["runner"]["address"] is None else cfg["runner"]["address"]
    asks = " and ".join(f"{amount:g} {UNITS[kind]}" for kind, amount in resources.items())
    print(f"[{stage}] {len(jobs)} jobs on {where}, each asking for {asks}")
    results, started = {}, {}
    pending = list(names)
    try:
        with progress(total=len(jobs), desc=f"{stage} jobs", unit="job") as bar:
            while pending:
                [ready], _ = ray.wait(pending, num_returns=1)
                name = names[ready]
                try:
                    value = _next_value(ray, ready, name, cfg["runner"]["max_retries"])
                except Exception:
                    bar.write(f"[{stage}] {name} failed")
                    raise
                if name not in started:  # the task's first yield: it is running
                    started[name] = time.perf_counter()
                    bar.write(f"[{stage}] started {name} on {value[0]} (pid {value[1]})")
                    continue
                results[name] = value
                pending.remove(ready)
                bar.update()
                bar.write(f"[{stage}] finished {name} in {time.perf_counter() - started[name]:.1f}s")
    finally:
        for generator in pending:  # after an error: the others stop now; a training job resumes later
            ray.cancel(generator, force=True)
        marker.unlink(missing_ok=True)
    return [results[name] for name in jobs]


def _next_value(ray, generator, name: str, retries: int):
    """The next value a job's task yields; its error as the MaskfoldError it raised, or one naming the job."""
    try:
        return ray.get(next(generator))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, MaskfoldError):
            raise error.cause from None
        raise
    except ray.exceptions.RayError as error:  # its worker or machine died more often than Ray retries
        raise MaskfoldError(f"job {name}: {type(error).__name__} after {retries} retries (runner.max_retries): "
                            f"{str(error).strip().splitlines()[0][:300]}") from error


def _shared_marker(cfg: dict) -> Path:
    """A file in output.dir that only this run writes: a job that cannot see it is on a machine that sees
    another folder at that path (its own disk, not the shared one)."""
    marker = output_dir(cfg) / f".runner-{uuid.uuid4().hex[:12]}"
    atomic_write_text(marker, f"{socket.gethostname()} pid {os.getpid()}: Ray jobs look for this file; "
                              f"removed when the run ends\n")
    return marker


# ---------------------------------------------------------------- Ray: inside a task, on any machine

def _ray_job(cfg: dict, work, prepare, args: tuple, force: bool, driver_cwd: str, marker: str):
    """One job as a Ray task: say where it runs, check that it sees the shared paths, then work.

    A generator, so that the driver hears when the job starts (its first yield), not only when it ends.
    """
    yield socket.gethostname(), os.getpid()
    if not os.path.isdir(driver_cwd):
        raise MaskfoldError(f"{socket.gethostname()} has no folder {driver_cwd}, where the run was started from: "
                            f"config paths are relative to it (README, 'Many GPUs and machines')")
    os.chdir(driver_cwd)  # a Ray worker starts wherever its raylet was started
    require_visible(cfg, Path(marker))
    if cfg["train"]["threads"]:
        import torch

        torch.set_num_threads(cfg["train"]["threads"])  # for stages that build no training job (infer)
    yield work(cfg, *args, _context(prepare, cfg), force=force)


def require_visible(cfg: dict, marker: Path) -> None:
    """Refuse to start a job on a machine that cannot see what it needs, naming every such path."""
    needed = {"data.root": Path(cfg["data"]["root"]), "data.cache_dir": Path(cfg["data"]["cache_dir"]),
              "folds file": folds_path(cfg), "output.dir": marker.parent}
    if cfg["data"]["label_fixes"]:
        needed["data.label_fixes"] = Path(cfg["data"]["label_fixes"])
    missing = [f"{key} {path.absolute()}" for key, path in needed.items() if not path.exists()]
    if not missing and not marker.exists():
        missing.append(f"output.dir {marker.parent.absolute()} of the run (this machine has a folder of its own there)")
    if missing:
        raise MaskfoldError(f"{socket.gethostname()} cannot see {'; '.join(missing)}: every machine of the Ray "
                            f"cluster must see the data, cache, folds and output folders at the same paths "
                            f"(README, 'Many GPUs and machines')")


# this worker process's prepared context, for its next job of the same run (on CPU: a GPU job's worker ends with it)
_CONTEXTS: dict = {}


def _context(prepare, cfg: dict):
    key = (prepare.__module__, prepare.__qualname__, stable_hash(cfg))
    if key not in _CONTEXTS:
        _CONTEXTS.clear()  # one at a time: a worker never holds two runs' data
        _CONTEXTS[key] = prepare(cfg)
    return _CONTEXTS[key]
