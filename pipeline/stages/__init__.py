"""The entry points. Each stage module only wires library code: parse, `run(cfg)`, print.

    python -m pipeline.stages.<stage> -c CONFIG [--force] [key.sub=value ...]
    ./run.sh <stage> ...                      (the same, through `python -m pipeline <stage>`)

STAGES is the one list of stages: run.sh takes the pipeline's chain from it and a test checks the
README's stage table against it. No stage imports another stage.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass

from pipeline.errors import MaskfoldError
from pipeline.io import PROJECT_ROOT


@dataclass(frozen=True)
class Stage:
    name: str
    purpose: str
    chain: str  # "demo": only in the demo's chain; "all": in every full run; "": run on its own


STAGES = (
    Stage("synth", "generate the demo dataset in the competition layout", "demo"),
    Stage("check", "validate the data, list every problem, print counts; EDA plots in check/report.html", "all"),
    Stage("faces", "find every face once (MTCNN) for data.crop.mode: detect; boxes table and contact sheet", "all"),
    Stage("folds", "assign person-grouped, stratified folds", "all"),
    Stage("train", "train every (backbone, fold) job with early stopping and checkpoints", "all"),
    Stage("oof", "pool out-of-fold predictions; report macro F1 with plots", "all"),
    Stage("audit", "rank the training labels most likely wrong (cleanlab on OOF); suggested fixes for review", "all"),
    Stage("infer", "predict eval and validation images with TTA for every fold model", "all"),
    Stage("ensemble", "soft-vote folds and backbones into submission.csv", "all"),
    Stage("preview", "what the model is fed: crops, draws of the train augmentation, TTA views (check/preview.png)", ""),
    Stage("pseudo", "pseudo-labels: the eval images the ensemble is sure of, per head, for a second run", ""),
    Stage("export", "the run's ensemble as a portable bundle: one ONNX graph, its face finder, bundle.json", ""),
    Stage("predict", "predict photos, a folder, a video or a camera with a bundle: a box and a verdict per face", ""),
    Stage("serve", "the gate's HTTP server on 127.0.0.1: camera page, POST /predict, events, webhook", ""),
    Stage("summary", "print the summary table (run.sh adds timings and the demo's held-out score)", ""),
    Stage("tune", "Optuna study over config values with pruning and retries", ""),
    Stage("dashboard", "serve the Optuna dashboard for tune.storage on 127.0.0.1", ""),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def chain(demo: bool) -> list[str]:
    """The stages a full run executes, in order."""
    return [s.name for s in STAGES if s.chain == "all" or (demo and s.chain == "demo")]


def stage_main(run, stage: str, extra_args=None) -> None:
    """The CLI every stage shares. Expected errors (MaskfoldError) print one line; anything else,
    a CUDA out-of-memory error or a bug, keeps its traceback."""
    from pipeline.config import load_config

    purpose = next(s.purpose for s in STAGES if s.name == stage)
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{stage}", description=purpose)
    parser.add_argument("-c", "--config", default=str(PROJECT_ROOT / "configs" / "demo.yaml"),
                        help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--force", action="store_true", help="redo work whose outputs already exist")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.folds=[0,2]")
    if extra_args:
        extra_args(parser)
    args = parser.parse_args()
    extra = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "force")}
    # the library's warnings (a failed webhook post, a bundle not reloaded, ...) go through `logging` with their
    # level; MASKFOLD_LOG_LEVEL=DEBUG shows more, ERROR less
    logging.basicConfig(level=os.environ.get("MASKFOLD_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format=f"[{stage}] %(levelname)s %(name)s: %(message)s")
    started = time.time()
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, force=args.force, **extra)
    except MaskfoldError as error:
        sys.exit(f"[{stage}] error: {error}")
    print(f"[{stage}] done in {time.time() - started:.1f}s")
