"""A real gate server process for tests (python -m tests.gate_server ...): pipeline.gate.server's app on
uvicorn, on 127.0.0.1, with a gate whose work the test controls. --hold FILE makes every frame wait (up to 30 s)
until FILE exists, as a slow frame would, so a test can see what the server does meanwhile; --no-mask X0,Y0,X1,Y1
makes every frame one face without a mask at that box (tracking without a model's whims)."""
import argparse
import os
import time
from pathlib import Path

import uvicorn

from pipeline.gate.events import EventLog
from pipeline.gate.runtime import Gate
from pipeline.gate.server import GateState, Limits, create_app


def _no_mask(box):
    def predict(image, faces="all"):
        return [{"box": list(box), "score": 0.99, "source": "detector", "crop": [int(v) for v in box], "class": 12,
                 "class_name": "not_worn/male/<30", "probability": 0.9,
                 "heads": {"mask": {"class": "not_worn", "probability": 0.93},
                           "gender": {"class": "male", "probability": 0.9}, "age": {"class": "<30", "probability": 0.9}},
                 "probabilities": {"mask": [0.03, 0.04, 0.93]}, "verdict": "no_mask"}]
    return predict


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-in-flight", type=int, default=1)
    parser.add_argument("--limit", type=int, default=2 * 1024 * 1024)
    parser.add_argument("--hold", default=None)
    parser.add_argument("--no-mask", default=None)
    parser.add_argument("--token-env", default=None)
    args = parser.parse_args()
    gate = Gate(args.bundle)
    work = gate.predict
    if args.no_mask:
        work = _no_mask([float(v) for v in args.no_mask.split(",")])
    if args.hold:
        inner = work

        def work(image, faces="all"):
            deadline = time.time() + 30
            while not Path(args.hold).exists() and time.time() < deadline:
                time.sleep(0.01)
            return inner(image, faces)
    gate.predict = work
    state = GateState(gate, EventLog(Path(args.events)), Limits(args.limit, args.workers, args.max_in_flight),
                      os.environ[args.token_env] if args.token_env else None)
    uvicorn.run(create_app(state), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
