"""The gate's server: predictions over HTTP, bad input that never takes it down, one event per person, the
webhook (delivered, and a dead one that costs no frame), and a real server process on 127.0.0.1."""
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.gate.events import EventLog
from pipeline.gate.runtime import Gate
from pipeline.gate.server import create_app
from pipeline.io import PROJECT_ROOT
from tests.conftest import camera_frame

LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def gate(gate_run):
    return Gate(gate_run["bundle"])


@pytest.fixture
def client(gate, tmp_path):
    events = EventLog(tmp_path / "events.jsonl")
    with TestClient(create_app(gate, events, LIMIT)) as test_client:
        test_client.events = events
        yield test_client


def _jpeg(image) -> bytes:
    return cv2.imencode(".jpg", image[:, :, ::-1])[1].tobytes()


def _bomb() -> bytes:
    png = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
    png[16:24] = struct.pack(">II", 30000, 30000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_predict_returns_every_face_with_its_box_heads_and_verdict(client, portrait):
    response = client.post("/predict", files={"file": ("frame.jpg", _jpeg(camera_frame(portrait)), "image/jpeg")})
    assert response.status_code == 200
    result = response.json()
    assert (result["width"], result["height"]) == (1280, 720) and len(result["faces"]) == 1
    face = result["faces"][0]
    x0, y0, x1, y1 = face["box"]
    assert 400 < x0 < x1 < 400 + 512 * 0.8 and 100 < y0 < y1 < 100 + 600 * 0.8
    assert face["verdict"] in ("ok", "incorrect", "no_mask") and set(face["heads"]) == {"mask", "gender", "age"}
    assert abs(sum(face["probabilities"]["joint"]) - 1) < 1e-4 and len(face["probabilities"]["joint"]) == 18
    assert client.get("/health").json()["frames"] == 1


def test_the_page_opens_the_camera_and_has_an_upload_button(client):
    page = client.get("/")
    assert page.status_code == 200 and "getUserMedia" in page.text and 'type="file"' in page.text


@pytest.mark.parametrize("case, status, reason", [
    ("not an image", 400, "not a JPEG or PNG"),
    ("empty", 400, "empty body"),
    ("truncated JPEG", 400, "truncated JPEG"),
    ("too many pixels", 400, "more than the gate takes"),
    ("over the size limit", 413, "over the gate's limit"),
    ("wrong content type", 415, "multipart form field 'file'"),
    ("no file field", 422, "multipart form field 'file'"),
])
def test_bad_input_gets_a_4xx_with_a_reason_and_the_next_request_is_served(client, portrait, case, status, reason):
    jpeg = _jpeg(camera_frame(portrait))
    if case == "wrong content type":
        response = client.post("/predict", content=jpeg, headers={"content-type": "image/jpeg"})
    elif case == "no file field":
        response = client.post("/predict", files={"photo": ("x.jpg", jpeg, "image/jpeg")})  # another field name
    else:
        body = {"not an image": b"GIF89a, or a text file", "empty": b"", "truncated JPEG": jpeg[:len(jpeg) // 2],
                "too many pixels": _bomb(), "over the size limit": jpeg + b"\0" * LIMIT}[case]
        response = client.post("/predict", files={"file": ("x.jpg", body, "image/jpeg")})
    assert response.status_code == status
    assert reason in response.json()["error"] and "\n" not in response.json()["error"]
    assert client.post("/predict", files={"file": ("f.jpg", jpeg, "image/jpeg")}).status_code == 200


def _no_mask(box):
    def predict(image, faces="all"):
        return [{"box": list(box), "score": 0.99, "source": "detector", "crop": [int(v) for v in box], "class": 12,
                 "class_name": "not_worn/male/<30", "probability": 0.9,
                 "heads": {"mask": {"class": "not_worn", "probability": 0.93}, "gender": {"class": "male", "probability": 0.9},
                           "age": {"class": "<30", "probability": 0.9}},
                 "probabilities": {"mask": [0.03, 0.04, 0.93]}, "verdict": "no_mask"}]
    return predict


def test_a_person_standing_still_is_one_event_and_a_second_person_another(client, gate, portrait, monkeypatch):
    jpeg = _jpeg(camera_frame(portrait))
    monkeypatch.setattr(gate, "predict", _no_mask((500, 150, 700, 400)))
    raised = [client.post("/predict", files={"file": ("f.jpg", jpeg, "image/jpeg")}).json()["events"] for _ in range(5)]
    assert [len(r) for r in raised] == [1, 0, 0, 0, 0]
    monkeypatch.setattr(gate, "predict", _no_mask((510, 155, 705, 410)))  # the same person, moved a little
    assert client.post("/predict", files={"file": ("f.jpg", jpeg, "image/jpeg")}).json()["events"] == []
    monkeypatch.setattr(gate, "predict", _no_mask((50, 100, 250, 350)))  # someone else, elsewhere
    assert len(client.post("/predict", files={"file": ("f.jpg", jpeg, "image/jpeg")}).json()["events"]) == 1
    events = client.get("/events").json()["events"]
    assert len(events) == 2 and events[0]["verdict"] == "no_mask" and events[0]["thumbnail_jpeg"]
    logged = [json.loads(line) for line in client.events.path.read_text().splitlines()]
    assert [e["id"] for e in logged] == [1, 2]


def test_a_person_who_leaves_and_comes_back_is_a_new_event():
    log = EventLog(None, track_seconds=3.0)
    image = np.zeros((720, 1280, 3), np.uint8)
    record = _no_mask((500, 150, 700, 400))(image)
    assert len(log.observe(image, record, now=100.0)) == 1
    assert log.observe(image, record, now=102.0) == []
    assert len(log.observe(image, record, now=106.0)) == 1  # unseen for over track_seconds: a new person


class _Receiver(BaseHTTPRequestHandler):
    received: list = []
    delay = 0.0

    def do_POST(self):
        time.sleep(self.delay)
        self.received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    _Receiver.received, _Receiver.delay = [], 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, _Receiver
    server.shutdown()


def test_the_webhook_receives_each_event_once(gate, portrait, tmp_path, monkeypatch, receiver):
    server, handler = receiver
    events = EventLog(tmp_path / "events.jsonl", webhook=f"http://127.0.0.1:{server.server_port}/hook")
    monkeypatch.setattr(gate, "predict", _no_mask((500, 150, 700, 400)))
    with TestClient(create_app(gate, events, LIMIT)) as client:
        for _ in range(3):
            client.post("/predict", files={"file": ("f.jpg", _jpeg(camera_frame(portrait)), "image/jpeg")})
    deadline = time.time() + 10
    while not handler.received and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(handler.received) == 1
    assert handler.received[0]["verdict"] == "no_mask" and handler.received[0]["thumbnail_jpeg_base64"]
    assert events.delivered == [(1, "HTTP 204")]


def test_a_dead_webhook_costs_no_frame(gate, portrait, tmp_path, monkeypatch, receiver):
    server, handler = receiver
    handler.delay = 5.0  # a receiver that hangs for longer than the timeout
    events = EventLog(tmp_path / "events.jsonl", webhook=f"http://127.0.0.1:{server.server_port}/hook",
                      webhook_timeout_s=0.5)
    jpeg = _jpeg(camera_frame(portrait))
    with TestClient(create_app(gate, events, LIMIT)) as client:
        for box in ((500, 150, 700, 400), (50, 100, 250, 350), (900, 100, 1100, 350)):  # three people, three events
            monkeypatch.setattr(gate, "predict", _no_mask(box))
            started = time.perf_counter()
            assert len(client.post("/predict", files={"file": ("f.jpg", jpeg, "image/jpeg")}).json()["events"]) == 1
            assert time.perf_counter() - started < 0.5  # the frame never waits for the webhook
    deadline = time.time() + 10
    while len(events.delivered) < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert events.delivered[0] == (1, "failed: TimeoutError")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_on_127_0_0_1_as_a_real_process(gate_run, portrait, tmp_path):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.serve", "-c", "configs/demo.yaml", "--bundle", str(gate_run["bundle"]),
         "--port", str(port), f"output.dir={tmp_path / 'run'}"], cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        health = httpx.get(f"{url}/health", timeout=5).json()
        assert health["status"] == "ok" and health["bundle"]["input_size"] == [32, 40]
        assert "getUserMedia" in httpx.get(url, timeout=5).text
        response = httpx.post(f"{url}/predict", files={"file": ("f.jpg", _jpeg(camera_frame(portrait)), "image/jpeg")},
                              timeout=30)
        assert response.status_code == 200 and len(response.json()["faces"]) == 1
        assert httpx.post(f"{url}/predict", files={"file": ("x.jpg", b"junk", "image/jpeg")}, timeout=30).status_code == 400
        assert httpx.get(f"{url}/health", timeout=5).json()["frames"] == 1
    finally:
        process.terminate()
        process.wait(timeout=20)
