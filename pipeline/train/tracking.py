"""Where a job's epoch records go besides metrics.jsonl: TensorBoard (always, <job>/tb/) and Weights &
Biases when `log.wandb` is offline or online.

W&B: one run per (backbone, fold) job, named `<backbone>-fold<k>`, grouped by `log.group` (default: the
config's name), in `log.project`; its config is the resolved config with every URL password masked.
Offline, the run is a local folder under <job>/wandb/ (`wandb sync <job>/wandb/offline-run-*` uploads
it later) and nothing touches the network. The run id lives in the job's loop state, so a resumed job
continues its own run. With `off`, wandb is never imported.
"""
from __future__ import annotations

import uuid

from pipeline.artifacts import Artifact
from pipeline.errors import ConfigError, WriteError
from pipeline.io import redacted


def _tb_error(artifact: Artifact, error: OSError, after: str = "") -> WriteError:
    return WriteError(f"cannot write TensorBoard scalars in {artifact.path('tb')}: {error.strerror or error}{after}")


class RunLog:
    """TensorBoard writer plus the optional W&B run of one job; a context manager that closes both."""

    def __init__(self, cfg: dict, artifact: Artifact, backbone: str, fold: int, start_epoch: int, state):
        from torch.utils.tensorboard import SummaryWriter

        self.artifact = artifact
        try:
            self.writer = SummaryWriter(log_dir=str(artifact.path("tb")), purge_step=start_epoch)
        except OSError as error:
            raise _tb_error(artifact, error) from error
        self.wandb = _wandb_run(cfg, artifact, backbone, fold, state)

    def log(self, record: dict) -> None:
        epoch = record["epoch"]
        try:
            for key, value in record.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, epoch)
            self.writer.flush()
        except OSError as error:
            raise _tb_error(artifact=self.artifact, error=error, after=f"; epoch {epoch}'s checkpoint is saved") from error
        if self.wandb is not None:
            self.wandb.log(record, step=epoch)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if exc[0] is None else 1)


def _wandb_run(cfg: dict, artifact: Artifact, backbone: str, fold: int, state):
    mode = cfg["log"]["wandb"] or "off"  # YAML reads a bare `off` as false
    if mode == "off":
        return None
    try:
        import wandb
    except ImportError as error:
        raise ConfigError(f"log.wandb is {mode!r} but the wandb package is not installed (pip install wandb)") from error
    state.wandb_id = state.wandb_id or uuid.uuid4().hex[:12]
    folder = artifact.folder
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(mode=mode, dir=str(folder), project=cfg["log"]["project"], entity=cfg["log"]["entity"],
                          group=cfg["log"]["group"] or cfg.get("name"), name=f"{backbone}-fold{fold}",
                          job_type="train", id=state.wandb_id, resume="allow", config=redacted(cfg),
                          settings=wandb.Settings(console="off", silent=True, save_code=False))
    except wandb.errors.Error as error:
        raise ConfigError(f"log.wandb: {mode} run for {backbone} fold {fold} could not start: "
                          f"{str(error).splitlines()[0][:200]} (log.wandb: offline logs without a network)") from error
