"""Notify, as the competition's problem statement asks: a mask worn wrongly or not at all becomes one event
per person, not one per frame.

A person is followed from frame to frame, within one stream (a camera, or a browser's page: each has its own
track state, so two people at two doors are two people), by the overlap of their face boxes (IoU >=
gate.track_iou with a face seen in the last gate.track_seconds): a track raises an event when its verdict first
turns `incorrect` or `no_mask`, and again only if it turns into the other one.

What is kept (docs/GATE.md, "What the gate stores"): each event is a line of events.jsonl (owner-only, rotated
to events.jsonl.1 past gate.events_log_mb) holding the time, stream, verdict, probabilities and box, and no
image. Only with gate.thumbnails: true is the face kept too, as a 64-px JPEG beside it (owner-only), deleted
after gate.events_keep_days. With gate.webhook set, each event is POSTed as JSON from a background thread,
under one deadline for the whole post, so a slow or dead receiver never delays a frame; its failures and drops
are counted and logged.
"""
from __future__ import annotations

import base64
import http.client
import itertools
import json
import logging
import os
import queue
import socket
import threading
import time
import urllib.parse
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

ALERTS = ("incorrect", "no_mask")
OUTCOMES = ("delivered", "failed", "dropped")
MAX_STREAMS = 256          # streams whose tracks are kept at once; the least recently seen goes first
PRUNE_EVERY_S = 600.0      # how often old thumbnails are looked for while events come
log = logging.getLogger("maskfold.gate")


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    box: list
    last_seen: float
    alerted: str | None = None  # the verdict an event was raised for


def _owner_only(path: Path) -> int:
    """A file descriptor for appending to `path`, created owner-only (0600) whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def post_json(url: str, body: bytes, deadline_s: float) -> int:
    """POST `body` to `url`; the HTTP status. One deadline for the whole exchange: urllib's and httpx's timeouts
    apply to each socket operation, so a receiver that trickles a byte a second never times out under them.
    Written by hand for that: a timer shuts the socket down when the deadline passes, which ends any blocked
    read or write at once (TimeoutError)."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=deadline_s)
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        if connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(deadline_s, cut)
    timer.start()
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read(64 * 1024)
        return response.status
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise TimeoutError(f"no answer within {deadline_s:g} s") from None
        raise
    finally:
        timer.cancel()
        connection.close()


@dataclass
class EventLog:
    path: Path | None
    track_seconds: float = 3.0
    track_iou: float = 0.3
    kept: int = 200
    webhook: str | None = None
    webhook_timeout_s: float = 2.0
    thumbnails: bool = False
    keep_days: float = 7.0
    log_mb: float = 10.0
    on_outcome: object = None  # called with "delivered" | "failed" | "dropped" (the server's metrics)
    events: deque = field(default_factory=deque)
    streams: OrderedDict = field(default_factory=OrderedDict)  # stream id -> its tracks
    delivered: deque = field(default_factory=lambda: deque(maxlen=100))  # (event id, outcome), the latest ones
    outcomes: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.events = deque(maxlen=self.kept)
        self._outbox: queue.Queue = queue.Queue(maxsize=100)
        self._pruned = 0.0
        if self.path is not None:
            self.path = Path(self.path)
            self.prune()
        if self.webhook:
            threading.Thread(target=self._deliver, name="gate-webhook", daemon=True).start()

    @property
    def thumbnail_dir(self) -> Path | None:
        return self.path.parent / "thumbnails" if self.path is not None else None

    def observe(self, image: np.ndarray, records: list[dict], stream: str = "default",
                now: float | None = None) -> list[dict]:
        """Match this frame's faces to its stream's tracks; return the events it raises (already logged)."""
        now = time.time() if now is None else now
        raised = []
        with self._lock:
            for name in [name for name, tracks in self.streams.items()
                         if all(now - t.last_seen > self.track_seconds for t in tracks)]:
                del self.streams[name]
            tracks = [t for t in self.streams.pop(stream, []) if now - t.last_seen <= self.track_seconds]
            self.streams[stream] = tracks  # most recently seen last
            while len(self.streams) > MAX_STREAMS:
                self.streams.popitem(last=False)
            free = list(tracks)
            for record in records:
                track = max(free, key=lambda t: iou(t.box, record["box"]), default=None)
                if track is None or iou(track.box, record["box"]) < self.track_iou:
                    track = Track(record["box"], now)
                    tracks.append(track)
                else:
                    free.remove(track)
                track.box, track.last_seen = record["box"], now
                if record["verdict"] in ALERTS and track.alerted != record["verdict"]:
                    track.alerted = record["verdict"]
                    raised.append(self._event(image, record, stream, now))
            for event in raised:
                self._write(event)
        if raised and now - self._pruned > PRUNE_EVERY_S:
            self.prune(now)
        return raised

    def _event(self, image: np.ndarray, record: dict, stream: str, now: float) -> dict:
        number = next(self._ids)
        event = {"id": number, "time": round(now, 3),
                 "time_text": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)), "stream": stream,
                 "verdict": record["verdict"], "mask": record["heads"]["mask"],
                 "probabilities": record["probabilities"]["mask"], "box": record["box"]}
        if self.thumbnails and self.path is not None:
            jpeg = _thumbnail(image, record["box"])
            if jpeg:
                name = f"{int(now * 1000)}-{number}.jpg"  # unique across restarts, which restart the ids
                self.thumbnail_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = _owner_only(self.thumbnail_dir / name)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(jpeg)
                event["thumbnail"] = name
        self.events.appendleft(event)
        return event

    def _write(self, event: dict) -> None:
        if self.path is not None:  # one line per event, appended: a log, not an artifact to replace
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > self.log_mb * 1024 * 1024:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))  # the cap: one older file
            with os.fdopen(_owner_only(self.path), "a") as handle:
                handle.write(json.dumps(event) + "\n")
        if self.webhook:
            try:
                self._outbox.put_nowait(event)
            except queue.Full:  # a receiver that fell this far behind loses events, never frames
                self._outcome(event["id"], "dropped", "webhook queue full")

    def thumbnail(self, name: str) -> bytes | None:
        """A kept thumbnail's bytes by its event's file name, or None (none kept, pruned, or not a name of ours)."""
        if self.thumbnail_dir is None or "/" in name or not name.endswith(".jpg"):
            return None
        path = self.thumbnail_dir / name
        return path.read_bytes() if path.is_file() else None

    def prune(self, now: float | None = None) -> int:
        """Delete thumbnails older than keep_days; how many went."""
        now = time.time() if now is None else now
        self._pruned, gone = now, 0
        folder = self.thumbnail_dir
        if folder is None or not folder.is_dir():
            return 0
        for path in folder.glob("*.jpg"):
            try:
                if now - path.stat().st_mtime > self.keep_days * 86400:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:
                pass
        return gone

    def _outcome(self, event_id: int, outcome: str, detail: str) -> None:
        self.delivered.append((event_id, f"{outcome}: {detail}" if outcome != "delivered" else detail))
        self.outcomes[outcome] += 1
        if outcome != "delivered":
            log.warning("webhook: event %s %s (%s)", event_id, outcome, detail)
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def _deliver(self) -> None:
        while True:
            event = self._outbox.get()
            payload = dict(event)
            name = payload.pop("thumbnail", None)
            if name and (jpeg := self.thumbnail(name)):
                payload["thumbnail_jpeg_base64"] = base64.b64encode(jpeg).decode()
            try:
                status = post_json(self.webhook, json.dumps(payload).encode(), self.webhook_timeout_s)
                if 200 <= status < 300:
                    self._outcome(event["id"], "delivered", f"HTTP {status}")
                else:
                    self._outcome(event["id"], "failed", f"HTTP {status}")
            except Exception as error:  # a webhook failure is reported, never raised into the gate
                self._outcome(event["id"], "failed", type(error).__name__)


def _thumbnail(image: np.ndarray, box) -> bytes:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    face = image[max(y0, 0):max(y1, 1), max(x0, 0):max(x1, 1)]
    if not face.size:
        return b""
    scale = 64 / max(face.shape[:2])
    small = cv2.resize(face, (max(round(face.shape[1] * scale), 1), max(round(face.shape[0] * scale), 1)))
    return cv2.imencode(".jpg", small[:, :, ::-1])[1].tobytes()
