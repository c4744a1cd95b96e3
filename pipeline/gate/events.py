"""Notify, as the competition's problem statement asks: a mask worn wrongly or not at all becomes one event
per person, not one per frame.

A person is followed from frame to frame by the overlap of their face boxes (IoU >= gate.track_iou with a
face seen in the last gate.track_seconds): a track raises an event when its verdict first turns
`incorrect` or `no_mask`, and again only if it turns into the other one. Events are appended to
events.jsonl, kept in memory for the page, and, when gate.webhook is set, POSTed as JSON from a
background thread with a timeout, so a slow or dead receiver never delays a frame.
"""
from __future__ import annotations

import base64
import itertools
import json
import queue
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

ALERTS = ("incorrect", "no_mask")


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


@dataclass
class EventLog:
    path: Path | None
    track_seconds: float = 3.0
    track_iou: float = 0.3
    kept: int = 200
    webhook: str | None = None
    webhook_timeout_s: float = 2.0
    events: deque = field(default_factory=deque)
    tracks: list = field(default_factory=list)
    delivered: list = field(default_factory=list)  # (event id, outcome) of webhook posts, for /health and tests

    def __post_init__(self):
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.events = deque(maxlen=self.kept)
        self._outbox: queue.Queue = queue.Queue(maxsize=100)
        if self.webhook:
            threading.Thread(target=self._deliver, name="gate-webhook", daemon=True).start()

    def observe(self, image: np.ndarray, records: list[dict], now: float | None = None) -> list[dict]:
        """Match this frame's faces to tracks; return the events it raises (already logged)."""
        now = time.time() if now is None else now
        raised = []
        with self._lock:
            self.tracks = [t for t in self.tracks if now - t.last_seen <= self.track_seconds]
            free = list(self.tracks)
            for record in records:
                track = max(free, key=lambda t: iou(t.box, record["box"]), default=None)
                if track is None or iou(track.box, record["box"]) < self.track_iou:
                    track = Track(record["box"], now)
                    self.tracks.append(track)
                else:
                    free.remove(track)
                track.box, track.last_seen = record["box"], now
                if record["verdict"] in ALERTS and track.alerted != record["verdict"]:
                    track.alerted = record["verdict"]
                    raised.append(self._event(image, record, now))
        for event in raised:
            self._write(event)
        return raised

    def _event(self, image: np.ndarray, record: dict, now: float) -> dict:
        x0, y0, x1, y1 = (int(round(v)) for v in record["box"])
        face = image[max(y0, 0):max(y1, 1), max(x0, 0):max(x1, 1)]
        thumb = ""
        if face.size:
            scale = 64 / max(face.shape[:2])
            small = cv2.resize(face, (max(round(face.shape[1] * scale), 1), max(round(face.shape[0] * scale), 1)))
            thumb = base64.b64encode(cv2.imencode(".jpg", small[:, :, ::-1])[1].tobytes()).decode()
        event = {"id": next(self._ids), "time": round(now, 3),
                 "time_text": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                 "verdict": record["verdict"], "mask": record["heads"]["mask"],
                 "probabilities": record["probabilities"]["mask"], "box": record["box"], "thumbnail_jpeg": thumb}
        self.events.appendleft(event)
        return event

    def _write(self, event: dict) -> None:
        if self.path is not None:  # one line per event, appended: a log, not an artifact to replace
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(event) + "\n")
        if self.webhook:
            try:
                self._outbox.put_nowait(event)
            except queue.Full:  # a receiver that fell this far behind loses events, never frames
                self.delivered.append((event["id"], "dropped: webhook queue full"))

    def _deliver(self) -> None:
        while True:
            event = self._outbox.get()
            body = json.dumps({k: v for k, v in event.items() if k != "thumbnail_jpeg"} |
                              {"thumbnail_jpeg_base64": event["thumbnail_jpeg"]}).encode()
            request = urllib.request.Request(self.webhook, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.webhook_timeout_s) as response:
                    self.delivered.append((event["id"], f"HTTP {response.status}"))
            except Exception as error:  # a webhook failure is reported, never raised into the gate
                self.delivered.append((event["id"], f"failed: {type(error).__name__}"))
