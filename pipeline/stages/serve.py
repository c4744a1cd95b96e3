"""serve stage: the gate's HTTP server on 127.0.0.1 (pipeline.gate.server): the camera page at /, POST
/predict (an image as the multipart form field `file`), /events, /metrics and /health, from a bundle (default
<output.dir>/bundle, made by ./run.sh export). Events of masks worn wrongly or not at all go to
<output.dir>/gate/events.jsonl (no face image unless gate.thumbnails) and, with gate.webhook set, to that URL.
Another address than loopback needs gate.token (docs/GATE.md, What the gate stores)."""
from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import output_dir
from pipeline.stages import stage_main


def _arguments(parser) -> None:
    parser.add_argument("--bundle", default=None, help="bundle folder (default <output.dir>/bundle)")
    parser.add_argument("--port", type=int, default=None, help="port (default gate.port)")
    parser.add_argument("--host", default=None, help="address to listen on (default gate.host, 127.0.0.1)")


def run(cfg: dict, force: bool = False, bundle=None, port=None, host=None) -> None:
    from pipeline.errors import MissingArtifactError
    from pipeline.gate.server import serve

    folder = Path(bundle) if bundle else output_dir(cfg, "bundle")
    if not (folder / "bundle.json").exists():
        raise MissingArtifactError(f"bundle: {folder / 'bundle.json'} not found; run: ./run.sh export -c CONFIG")
    serve(cfg, folder, host or cfg["gate"]["host"], port or cfg["gate"]["port"])


if __name__ == "__main__":
    stage_main(run, "serve", _arguments)
