"""The gate's HTTP server (FastAPI on uvicorn): the camera page, predictions per frame, events and metrics.

    GET  /                   the gate page: the browser's camera (or an uploaded photo), each face's box and verdict
    POST /predict?stream=ID  an image as the multipart form field `file` (a browser form, `curl -F file=@photo.jpg`)
                             -> {"width", "height", "faces": [{box, heads, probabilities, verdict, ...}], "events"};
                             `stream` names the camera or page (its own track state; default: the client's address)
    GET  /events?limit=N     the latest events (a mask worn wrongly or not at all: one per person)
    GET  /events/thumbnail/NAME   an event's face, only with gate.thumbnails: true
    GET  /metrics            Prometheus' text format: frames, faces, verdicts, refused and shed requests, webhook
                             outcomes, latency histograms
    GET  /health             status and counters, for a supervisor: never behind the token, never slow

A door wants the newest frame, never a queue: decoding, finding faces and classifying run in a pool of worker
threads sized to the cores (onnxruntime and OpenCV release the GIL), off the event loop, so /health answers while
frames are worked on. At most gate.max_in_flight frames are in the pool; past that a frame gets 503 with
Retry-After, counted (shed, not queued). The body is counted as it arrives and cut at gate.max_upload_mb, chunked
or not, within gate.read_timeout_s. With gate.token every route but /health and the page (which holds no data,
and asks for the token) needs `Authorization: Bearer <token>`.
Bad input never takes it down: each gets a 4xx with a one-line reason and the next request is served.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request as StarletteRequest

from pipeline.gate.events import OUTCOMES, EventLog
from pipeline.gate.runtime import Gate, ImageError, decode

PAGE = Path(__file__).with_name("page.html")
STREAM = r"^[A-Za-z0-9_.:-]{1,64}$"
OPEN_ROUTES = {"/health", "/"}  # /health for supervisors; the page holds no data and asks for the token
log = logging.getLogger("maskfold.gate")


class Refused(Exception):
    def __init__(self, status: int, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


@dataclass
class Limits:
    max_upload_bytes: int
    workers: int = 0          # 0: the cores / 2 (each frame's onnxruntime runs on 2 threads), at least 1
    max_in_flight: int = 0    # 0: twice the workers
    read_timeout_s: float = 10.0

    def __post_init__(self):
        self.workers = self.workers or max(1, (os.cpu_count() or 1) // 2)
        self.max_in_flight = self.max_in_flight or 2 * self.workers


class Metrics:
    """The gate's counters, in a registry of its own (each app, each test, its own numbers)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("maskfold_gate_frames", "Frames classified", registry=r)
        self.faces = Counter("maskfold_gate_faces", "Faces classified", registry=r)
        self.verdicts = Counter("maskfold_gate_verdicts", "Faces by verdict", ["verdict"], registry=r)
        self.events = Counter("maskfold_gate_events", "Events raised (one per person)", ["verdict"], registry=r)
        self.refused = Counter("maskfold_gate_refused", "Requests refused with a 4xx", ["status"], registry=r)
        self.shed = Counter("maskfold_gate_shed", "Frames answered 503: work in flight at its bound", registry=r)
        self.webhook = Counter("maskfold_gate_webhook", "Webhook posts by outcome", ["outcome"], registry=r)
        self.in_flight = Gauge("maskfold_gate_in_flight", "Frames in the worker pool", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 5.0)
        self.frame_seconds = Histogram("maskfold_gate_frame_seconds", "A frame's work: decode, faces, classify",
                                       buckets=buckets, registry=r)
        self.request_seconds = Histogram("maskfold_gate_predict_seconds", "POST /predict, body read to answer",
                                         buckets=buckets, registry=r)
        for outcome in OUTCOMES:
            self.webhook.labels(outcome)
        for verdict in ("ok", "incorrect", "no_mask"):
            self.verdicts.labels(verdict)

    def value(self, name: str, **labels) -> int:
        return int(self.registry.get_sample_value(name, labels) or 0)


@dataclass
class GateState:
    """Everything the routes read and change: one small object."""
    gate: Gate
    events: EventLog
    limits: Limits
    token: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)
    in_flight: int = 0
    pool: ThreadPoolExecutor | None = None
    reload_every_s: float = 1.0
    reloads: int = 0
    _looked: float = 0.0
    _reloading: object = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="gate-frame")
        self.events.on_outcome = lambda outcome: self.metrics.webhook.labels(outcome).inc()

    def current_gate(self) -> Gate:
        """The gate to judge the next frame with: a newly exported bundle (its link points at another version) is
        loaded between frames, at most once a second, by one thread while the others go on with the old one."""
        gate, now = self.gate, time.monotonic()
        if now - self._looked < self.reload_every_s or not self._reloading.acquire(blocking=False):
            return gate
        try:
            self._looked = now
            if gate.link.resolve() != gate.folder:
                try:
                    self.gate = Gate(gate.link, gate.threads, gate.min_face)
                    self.reloads += 1
                    log.warning("bundle reloaded: %s (stamp %s)", self.gate.folder.name, self.gate.stamp)
                except Exception as error:  # a half-copied or broken bundle: keep judging with the old one
                    log.warning("bundle not reloaded, the old one stays: %s", str(error)[:300])
        finally:
            self._reloading.release()
        return self.gate

    def frame(self, data: bytes, stream: str) -> dict:
        """A frame's work, in a pool thread: decode, find and classify every face, raise its stream's events."""
        started = time.perf_counter()
        gate = self.current_gate()
        image = decode(data, gate.manifest["max_image_pixels"])
        records = gate.predict(image, "all")
        raised = self.events.observe(image, records, stream)
        seconds = time.perf_counter() - started
        m = self.metrics
        m.frames.inc()
        m.faces.inc(len(records))
        m.frame_seconds.observe(seconds)
        for record in records:
            m.verdicts.labels(record["verdict"]).inc()
        for event in raised:
            m.events.labels(event["verdict"]).inc()
        return {"width": image.shape[1], "height": image.shape[0], "faces": records, "events": raised,
                "ms": round(seconds * 1000, 1)}

    def health(self) -> dict:
        m, manifest = self.metrics, self.gate.manifest
        provenance = manifest["provenance"]
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1),
                "frames": m.value("maskfold_gate_frames_total"), "faces": m.value("maskfold_gate_faces_total"),
                "refused": sum(int(s.value) for s in _samples(m.refused)),
                "shed": m.value("maskfold_gate_shed_total"), "in_flight": self.in_flight,
                "workers": self.limits.workers, "max_in_flight": self.limits.max_in_flight,
                "events": len(self.events.events), "streams": len(self.events.streams),
                "thumbnails": self.events.thumbnails, "token": self.token is not None,
                "webhook": {"configured": bool(self.events.webhook), **{o: self.events.outcomes[o] for o in OUTCOMES}},
                "bundle": {"stamp": self.gate.stamp, "reloads": self.reloads, "git_commit": provenance["git_commit"],
                           "config_hash": provenance["config_hash"], "oof_macro_f1": provenance["oof_macro_f1"],
                           "trained_on": provenance.get("trained_on"),
                           "input_size": manifest["input"]["size"], "crop": manifest["crop"]["mode"]}}


def _samples(counter: Counter):
    return [s for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")]


def _refuse(state: GateState, status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    if status == 503:
        state.metrics.shed.inc()
    else:
        state.metrics.refused.labels(str(status)).inc()
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, counted as it arrives (chunked or not) and cut past `limit`: never spooled whole first."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"request of {int(declared)} bytes is over the gate's limit ({limit})")
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise Refused(413, f"request over the gate's limit ({limit} bytes)", {"Connection": "close"})
                chunks.append(chunk)
    except TimeoutError:
        raise Refused(408, f"the body did not arrive within {timeout_s:g} s", {"Connection": "close"}) from None
    return b"".join(chunks)


async def _image_field(request: Request, body: bytes, limit: int) -> bytes:
    """The bytes of the multipart field `file` of an already counted body; the form is closed after."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with StarletteRequest(request.scope, replay).form(max_files=1, max_fields=5,
                                                                max_part_size=limit) as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise Refused(422, "send the image as the multipart form field 'file'")
            return await upload.read(limit + 1)
    except Refused:
        raise
    except Exception as error:  # starlette words a malformed or oversized multipart body so
        raise Refused(400, f"unreadable multipart body ({str(error)[:120]})") from None


def create_app(state: GateState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="maskfold gate", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def _token(request: Request, call_next):
        if state.token is not None and request.url.path not in OPEN_ROUTES:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.token}".encode()):
                return _refuse(state, 401, "this gate needs its token: Authorization: Bearer <gate.token>",
                               {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError):
        problem = error.errors()[0]
        where, name = (problem["loc"] + ("?", "?"))[:2]
        return _refuse(state, 422, f"{where} parameter {name!r}: {problem['msg']}")

    @app.exception_handler(Refused)
    async def _refused(request: Request, error: Refused):
        return _refuse(state, error.status, error.reason, error.headers)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/health")
    def health() -> dict:
        return state.health()

    @app.get("/metrics")
    def metrics() -> Response:
        state.metrics.in_flight.set(state.in_flight)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/events")
    def recent(limit: int = Query(50, ge=0, le=500)) -> dict:
        return {"events": list(state.events.events)[:limit]}

    @app.get("/events/thumbnail/{name}")
    def thumbnail(name: str) -> Response:
        jpeg = state.events.thumbnail(name)
        if jpeg is None:
            raise Refused(404, f"no thumbnail {name!r} (gate.thumbnails is off, or it was pruned)")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.post("/predict")
    async def predict(request: Request, stream: str | None = Query(None, pattern=STREAM)):
        started = time.perf_counter()
        kind = request.headers.get("content-type", "")
        if not kind.startswith("multipart/form-data"):
            raise Refused(415, f"content type {kind[:60] or 'none'!r}: send the image as the multipart form field "
                               f"'file'")
        limit = state.limits.max_upload_bytes
        body = await _read_body(request, limit, state.limits.read_timeout_s)
        data = await _image_field(request, body, limit)
        if len(data) > limit:
            raise Refused(413, f"image over the gate's limit ({limit} bytes)")
        if state.in_flight >= state.limits.max_in_flight:  # shed, don't queue: a door wants the newest frame
            return _refuse(state, 503, f"the gate is busy ({state.in_flight} frames in flight); send a newer frame",
                           {"Retry-After": "1"})
        state.in_flight += 1  # the event loop's thread only: no lock needed
        try:
            client = request.client.host if request.client else "unknown"
            result = await asyncio.get_running_loop().run_in_executor(state.pool, state.frame, data,
                                                                      stream or client)
        except ImageError as error:
            raise Refused(400, str(error)) from None
        finally:
            state.in_flight -= 1
        state.metrics.request_seconds.observe(time.perf_counter() - started)
        return result

    return app


def serve(cfg: dict, bundle: Path, host: str, port: int) -> None:
    import uvicorn

    from pipeline.artifacts import output_dir

    g = cfg["gate"]
    token = gate_token(cfg, host)
    gate = Gate(bundle, min_face=g["min_face"])
    events = EventLog(output_dir(cfg, "gate", "events.jsonl"), g["track_seconds"], g["track_iou"], g["events_kept"],
                      g["webhook"], g["webhook_timeout_s"], g["thumbnails"], g["events_keep_days"],
                      g["events_log_mb"])
    limits = Limits(int(g["max_upload_mb"] * 1024 * 1024), g["workers"], g["max_in_flight"], g["read_timeout_s"])
    state = GateState(gate, events, limits, token)
    print(f"[serve] the gate on http://{host}:{port}/ ({limits.workers} worker(s), at most {limits.max_in_flight} "
          f"frames in flight; token {'on' if token else 'off'}; face thumbnails "
          f"{'kept ' + str(g['events_keep_days']) + ' days' if g['thumbnails'] else 'not kept'})", flush=True)
    uvicorn.run(create_app(state), host=host, port=port, log_level="warning", timeout_keep_alive=5)


def gate_token(cfg: dict, host: str) -> str | None:
    """gate.token's value (read from its environment variable), or None; an address beyond this machine without
    one is refused, naming gate.token."""
    import ipaddress

    from pipeline.errors import ConfigError

    reference = cfg["gate"]["token"]
    token = None
    if reference:
        name = reference.removeprefix("env:")
        token = os.environ.get(name) or None
        if token is None:
            raise ConfigError(f"gate.token: {reference}, but the environment variable {name} is not set (or empty)")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ConfigError(f"gate.host / --host: {host!r} is not an IP address (127.0.0.1, ::1, 0.0.0.0, ...)") \
            from None
    if not loopback and token is None:
        raise ConfigError(f"gate.host / --host: {host} opens the gate beyond this machine, and its routes hand out "
                          f"verdicts on faces: set gate.token (env:NAME, a variable holding the token) first")
    return token
