"""The gate's HTTP server (FastAPI on uvicorn): the camera page, predictions per frame, and the events.

    GET  /          the gate page: the browser's camera (or an uploaded photo), each face's box and verdict
    POST /predict   an image as the multipart form field `file` (a browser form, `curl -F file=@photo.jpg`)
                    -> {"width", "height", "faces": [{box, heads, probabilities, verdict, ...}], "events": [...]}
    GET  /events    the latest events (a mask worn wrongly or not at all: one per person)
    GET  /health    status, the bundle's provenance, counters

FastAPI because it is the light, testable choice: one module, the bundle loaded once at start-up,
TestClient tests that read like requests (gradio would bring a UI framework the page does not need).
Bad input never takes it down: each gets a 4xx with a one-line reason and the next request is served.
"""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from pipeline.gate.events import EventLog
from pipeline.gate.runtime import Gate, ImageError, decode

PAGE = Path(__file__).with_name("page.html")


def _refuse(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def create_app(gate: Gate, events: EventLog, max_upload_bytes: int) -> FastAPI:
    app = FastAPI(title="maskfold gate", docs_url=None, redoc_url=None)
    stats = {"started": time.time(), "frames": 0, "faces": 0, "refused": 0}

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError):
        stats["refused"] += 1
        return _refuse(422, "send the image as the multipart form field 'file'")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/health")
    def health() -> dict:
        provenance = gate.manifest["provenance"]
        return {"status": "ok", "uptime_s": round(time.time() - stats["started"], 1), **stats,
                "events": len(events.events), "webhook": "configured" if events.webhook else None,
                "bundle": {"folder": str(gate.folder), "git_commit": provenance["git_commit"],
                           "config_hash": provenance["config_hash"], "oof_macro_f1": provenance["oof_macro_f1"],
                           "input_size": gate.manifest["input"]["size"], "crop": gate.manifest["crop"]["mode"]}}

    @app.get("/events")
    def recent(limit: int = 50) -> dict:
        return {"events": list(events.events)[:max(min(limit, 500), 0)]}

    @app.post("/predict")
    async def predict(request: Request):
        kind = request.headers.get("content-type", "")
        if not kind.startswith("multipart/form-data"):
            stats["refused"] += 1
            return _refuse(415, f"content type {kind or 'none'!r}: send the image as the multipart form field 'file'")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes:
            stats["refused"] += 1
            return _refuse(413, f"request of {int(declared)} bytes is over the gate's limit ({max_upload_bytes})")
        try:
            form = await request.form(max_files=1, max_fields=5, max_part_size=max_upload_bytes)
        except Exception as error:  # starlette words a malformed or oversized multipart body so
            stats["refused"] += 1
            return _refuse(400, f"unreadable multipart body ({str(error)[:120]})")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            stats["refused"] += 1
            return _refuse(422, "send the image as the multipart form field 'file'")
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            stats["refused"] += 1
            return _refuse(413, f"image over the gate's limit ({max_upload_bytes} bytes)")
        try:
            image = decode(data, gate.manifest["max_image_pixels"])
        except ImageError as error:
            stats["refused"] += 1
            return _refuse(400, str(error))
        started = time.perf_counter()
        records = gate.predict(image, "all")
        raised = events.observe(image, records)
        stats["frames"] += 1
        stats["faces"] += len(records)
        return {"width": image.shape[1], "height": image.shape[0], "faces": records,
                "events": [{k: v for k, v in e.items() if k != "thumbnail_jpeg"} for e in raised],
                "ms": round((time.perf_counter() - started) * 1000, 1)}

    return app


def serve(cfg: dict, bundle: Path, host: str, port: int) -> None:
    import uvicorn

    from pipeline.artifacts import output_dir

    g = cfg["gate"]
    gate = Gate(bundle, min_face=g["min_face"])
    events = EventLog(output_dir(cfg, "gate", "events.jsonl"), g["track_seconds"], g["track_iou"], g["events_kept"],
                      g["webhook"], g["webhook_timeout_s"])
    app = create_app(gate, events, int(g["max_upload_mb"] * 1024 * 1024))
    print(f"[serve] the gate on http://{host}:{port}/ (bundle {bundle}; events: {events.path})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
