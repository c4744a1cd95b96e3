"""predict stage: a bundle (default <output.dir>/bundle, from ./run.sh export) on photos, a folder or glob of
photos, a video file or a camera; one row per face in <out>/predictions.csv (and predictions.jsonl for
streams), annotated copies with --draw (pipeline.gate.predict).

    ./run.sh predict -c configs/demo.yaml --input data/demo/eval/images          # as the submission crops them
    ./run.sh predict -c configs/demo.yaml --input frame.jpg --faces all --draw    # every face in a camera frame
    ./run.sh predict -c configs/demo.yaml --input 0 --fps 4                       # the first camera
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.artifacts import output_dir
from pipeline.stages import stage_main


def _arguments(parser) -> None:
    parser.add_argument("--input", required=True, help="a photo, a folder or glob of photos, a video, or a camera "
                                                       "(index like 0, or a URL)")
    parser.add_argument("--out", default=None, help="output folder (default <output.dir>/predict)")
    parser.add_argument("--bundle", default=None, help="bundle folder (default <output.dir>/bundle)")
    parser.add_argument("--faces", choices=("rule", "all"), default=None,
                        help="rule: the training crop of a portrait, one per photo (default for photos); "
                             "all: every face found (default for video and cameras)")
    parser.add_argument("--draw", action="store_true", help="write annotated copies with boxes and verdicts")
    parser.add_argument("--fps", type=float, default=4.0, help="frames per second taken from a video or camera")
    parser.add_argument("--max-frames", type=int, default=0, help="stop a stream after this many frames (0: at its end)")


def run(cfg: dict, force: bool = False, input: str = "", out=None, bundle=None, faces=None, draw=False,
        fps: float = 4.0, max_frames: int = 0) -> list[dict]:
    import json
    import shutil
    import time

    from pipeline.errors import ConfigError, DataError, MissingArtifactError
    from pipeline.gate.predict import finish_run, new_run_folder, predict_photos, predict_stream, sources, write_table
    from pipeline.gate.runtime import Gate
    from pipeline.io import atomic_write_text, redacted

    if not (0 < fps <= 1000):
        raise ConfigError(f"--fps {fps:g}: must be a number of frames per second in (0, 1000]")
    if max_frames < 0:
        raise ConfigError(f"--max-frames {max_frames}: must be 0 (the whole stream) or more")
    folder = Path(bundle) if bundle else output_dir(cfg, "bundle")
    if not (folder / "bundle.json").exists():
        raise MissingArtifactError(f"bundle: {folder / 'bundle.json'} not found; run: ./run.sh export -c CONFIG")
    gate = Gate(folder, min_face=cfg["gate"]["min_face"])
    out = Path(out) if out else output_dir(cfg, "predict")
    kind, items = sources(input)
    work, problems = new_run_folder(out), []
    record = {"input": redacted(str(input)), "kind": kind, "faces": faces or ("rule" if kind == "photos" else "all"),
              "bundle": gate.manifest["provenance"], "bundle_files": gate.manifest["files"],
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if kind == "photos":
        rows = predict_photos(gate, items, record["faces"], work, draw, int(cfg["gate"]["max_upload_mb"] * 2**20),
                              problems)
        record.update(photos=len(items), unreadable=problems)
        for line in problems:
            print(f"[predict] could not read {line}")
        if problems and len(problems) == len(items):
            shutil.rmtree(work)  # the last run's outputs stay as they were
            raise DataError([f"no input could be read ({len(items)} tried): {line}" for line in problems])
    else:
        record.update(fps=fps)
        rows = predict_stream(gate, items[0], record["faces"], work, draw, fps, max_frames, record)
    write_table(rows, work / "predictions.csv")
    record.update(faces_found=len(rows), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write_text(work / "predict.json", json.dumps(record, indent=1, default=str))
    finish_run(work, out)
    verdicts = Counter(row["verdict"] for row in rows)
    what = f"{len(items) - len(problems)} of {len(items)} photo(s)" if kind == "photos" else (
        f"{record['frames_taken']} frame(s) of the stream{' (interrupted)' if record.get('interrupted') else ''}")
    print(f"[predict] {len(rows)} face(s) in {what}: "
          + ", ".join(f"{v} {verdicts[v]}" for v in ("ok", "incorrect", "no_mask")) + f"; {out / 'predictions.csv'}")
    return rows


if __name__ == "__main__":
    stage_main(run, "predict", _arguments)
