"""dashboard: the Optuna dashboard for the config's study storage, served on 127.0.0.1 only.

    ./run.sh dashboard -c configs/demo.yaml [--port 8080]
"""
from __future__ import annotations

from pipeline.io import redacted
from pipeline.stages import stage_main


def run(cfg: dict, force: bool = False, port: int = 8080) -> None:
    from optuna_dashboard import run_server

    from pipeline.study import make_storage

    storage = make_storage(cfg)
    print(f"Optuna dashboard for {redacted(cfg['tune']['storage'])} on http://127.0.0.1:{port}/", flush=True)
    run_server(storage, host="127.0.0.1", port=port)


def _args(parser) -> None:
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")


if __name__ == "__main__":
    stage_main(run, "dashboard", extra_args=_args)
