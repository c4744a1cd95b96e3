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
    from pipeline.errors import MissingArtifactError
    from pipeline.gate.predict import predict_photos, predict_stream, sources, write_table
    from pipeline.gate.runtime import Gate

    folder = Path(bundle) if bundle else output_dir(cfg, "bundle")
    if not (folder / "bundle.json").exists():
        raise MissingArtifactError(f"bundle: {folder / 'bundle.json'} not found; run: ./run.sh export -c CONFIG")
    gate = Gate(folder, min_face=cfg["gate"]["min_face"])
    out = Path(out) if out else output_dir(cfg, "predict")
    kind, items = sources(input)
    if kind == "photos":
        rows = predict_photos(gate, items, faces or "rule", out, draw)
    else:
        rows = predict_stream(gate, items[0], faces or "all", out, draw, fps, max_frames)
    write_table(rows, out / "predictions.csv")
    verdicts = Counter(row["verdict"] for row in rows)
    print(f"[predict] {len(rows)} face(s) in {len(items) if kind == 'photos' else 'the stream'}: "
          + ", ".join(f"{v} {verdicts[v]}" for v in ("ok", "incorrect", "no_mask")) + f"; {out / 'predictions.csv'}")
    return rows


if __name__ == "__main__":
    stage_main(run, "predict", _arguments)
