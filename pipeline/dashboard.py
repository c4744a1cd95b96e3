"""The Optuna dashboard for the config's study storage, served on 127.0.0.1.

    ./run.sh dashboard -c configs/demo.yaml [--port 8080]
"""
from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", default="configs/demo.yaml")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    from optuna_dashboard import run_server

    from pipeline.tune import make_storage

    storage = make_storage(cfg)
    print(f"Optuna dashboard for {cfg['tune']['storage']} on http://127.0.0.1:{args.port}/", flush=True)
    run_server(storage, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
