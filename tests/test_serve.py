"""The gate's server: predictions over HTTP, bad input that never takes it down, one event per person, the
webhook (delivered, and a dead one that costs no frame), and a real server process on 127.0.0.1."""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.gate.events import EventLog
from pipeline.gate.runtime import Gate
from pipeline.gate.server import GateState, Limits, create_app
from pipeline.io import PROJECT_ROOT
from tests.conftest import camera_frame, wait_for_server

LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def gate(gate_run):
    return Gate(gate_run["bundle"])


def _app(gate, events):
    return create_app(GateState(gate, events, Limits(LIMIT)))


@pytest.fixture
def client(gate, tmp_path):
    events = EventLog(tmp_path / "events.jsonl")
    with TestClient(_app(gate, events)) as test_client:
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
    assert len(events) == 2 and events[0]["verdict"] == "no_mask"
    logged = [json.loads(line) for line in client.events.path.read_text().splitlines()]
    assert [e["id"] for e in logged] == [1, 2]
    # faces are personal data: by default no event keeps one, and the log is the owner's alone
    assert all("thumbnail" not in e for e in events + logged)
    assert client.events.path.stat().st_mode & 0o777 == 0o600 and not client.events.thumbnail_dir.exists()


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
    with TestClient(_app(gate, events)) as client:
        for _ in range(3):
            client.post("/predict", files={"file": ("f.jpg", _jpeg(camera_frame(portrait)), "image/jpeg")})
    deadline = time.time() + 10
    while not handler.received and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(handler.received) == 1
    assert handler.received[0]["verdict"] == "no_mask" and "thumbnail_jpeg_base64" not in handler.received[0]
    assert list(events.delivered) == [(1, "HTTP 204")] and events.outcomes["delivered"] == 1


def test_a_dead_webhook_costs_no_frame(gate, portrait, tmp_path, monkeypatch, receiver):
    server, handler = receiver
    handler.delay = 5.0  # a receiver that hangs for longer than the timeout
    events = EventLog(tmp_path / "events.jsonl", webhook=f"http://127.0.0.1:{server.server_port}/hook",
                      webhook_timeout_s=0.5)
    jpeg = _jpeg(camera_frame(portrait))
    with TestClient(_app(gate, events)) as client:
        for box in ((500, 150, 700, 400), (50, 100, 250, 350), (900, 100, 1100, 350)):  # three people, three events
            monkeypatch.setattr(gate, "predict", _no_mask(box))
            assert len(client.post("/predict", files={"file": ("f.jpg", jpeg, "image/jpeg")}).json()["events"]) == 1
        # the frames were answered while the first post still hung: nothing was delivered yet
        answered_before_any_delivery = not events.delivered
    deadline = time.time() + 10
    while len(events.delivered) < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert answered_before_any_delivery and events.delivered[0] == (1, "failed: TimeoutError")


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
        url = f"http://127.0.0.1:{port}"
        assert wait_for_server(url)
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


# ---- a busy door: a real server process (tests/gate_server.py) on 127.0.0.1, its frames' work held by the test ----

class _Server:
    def __init__(self, gate_run, tmp_path, *args, env=None):
        self.port, self.tmp = _free_port(), tmp_path
        self.hold = tmp_path / "release"
        self.events = tmp_path / "events.jsonl"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.gate_server", "--bundle", str(gate_run["bundle"]), "--port", str(self.port),
             "--events", str(self.events), *args], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"
        if not wait_for_server(self.url):
            raise RuntimeError("the gate server did not start")

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.fixture
def server(gate_run, tmp_path):
    made = []

    def start(*args, env=None):
        made.append(_Server(gate_run, tmp_path, *args, env=env))
        return made[-1]

    yield start
    for one in made:
        one.close()


def _post(url, jpeg, stream=None, timeout=60, **kwargs):
    query = f"?stream={stream}" if stream else ""
    return httpx.post(f"{url}/predict{query}", files={"file": ("f.jpg", jpeg, "image/jpeg")}, timeout=timeout, **kwargs)


def test_health_answers_while_a_frame_is_worked_on_and_a_frame_past_the_bound_is_shed(server, portrait, tmp_path):
    gate = server("--hold", str(tmp_path / "release"), "--workers", "1", "--max-in-flight", "1")
    jpeg = _jpeg(camera_frame(portrait))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_post, gate.url, jpeg)
        deadline = time.time() + 30
        while httpx.get(f"{gate.url}/health", timeout=10).json()["in_flight"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{gate.url}/health", timeout=10).json()  # answered while the frame is held
        assert health["in_flight"] == 1 and health["frames"] == 0
        shed = _post(gate.url, jpeg)
        assert shed.status_code == 503 and shed.headers["retry-after"] == "1" and "busy" in shed.json()["error"]
        (gate.tmp / "release").touch()
        assert first.result().status_code == 200
    health = httpx.get(f"{gate.url}/health", timeout=10).json()
    assert (health["frames"], health["shed"], health["in_flight"]) == (1, 1, 0)
    metrics = httpx.get(f"{gate.url}/metrics", timeout=10).text
    assert "maskfold_gate_shed_total 1.0" in metrics and "maskfold_gate_frames_total 1.0" in metrics
    assert "maskfold_gate_frame_seconds_bucket" in metrics


def test_a_chunked_upload_is_cut_at_the_limit_as_it_arrives(server, portrait):
    gate = server("--limit", str(1024 * 1024))
    sent = []

    def body():  # 64 MB, chunked (no Content-Length), far past the 1 MB limit
        for _ in range(1024):
            sent.append(64 * 1024)
            yield b"-" * (64 * 1024)

    headers = {"content-type": "multipart/form-data; boundary=x"}
    try:
        response = httpx.post(f"{gate.url}/predict", content=body(), headers=headers, timeout=60)
        assert response.status_code == 413 and "over the gate's limit" in response.json()["error"]
    except httpx.HTTPError:
        pass  # the server closed the connection after its 413, while the client still sent
    assert sum(sent) < 16 * 1024 * 1024  # stopped long before the 64 MB: nothing was spooled whole
    assert _post(gate.url, _jpeg(camera_frame(portrait))).status_code == 200


@pytest.mark.parametrize("url, name", [("/events?limit=lots", "limit"), ("/events?limit=-1", "limit")])
def test_a_bad_query_parameter_gets_a_422_naming_it(client, url, name):
    response = client.get(url)
    assert response.status_code == 422 and f"query parameter '{name}'" in response.json()["error"]


def test_a_bad_stream_id_gets_a_422_naming_it(client, portrait):
    response = client.post("/predict?stream=a/b", files={"file": ("f.jpg", _jpeg(camera_frame(portrait)), "image/jpeg")})
    assert response.status_code == 422 and "query parameter 'stream'" in response.json()["error"]


def test_each_stream_has_its_own_people(server, portrait):
    gate = server("--no-mask", "500,150,700,400", "--max-in-flight", "4")
    jpeg = _jpeg(camera_frame(portrait))
    raised = [len(_post(gate.url, jpeg, stream).json()["events"]) for stream in ("door-a", "door-b", "door-a")]
    assert raised == [1, 1, 0]  # the same box at two doors is two people; again at the first door, the same one
    health = httpx.get(f"{gate.url}/health", timeout=10).json()
    assert health["streams"] == 2 and health["events"] == 2
    assert [json.loads(line)["stream"] for line in gate.events.read_text().splitlines()] == ["door-a", "door-b"]


def test_with_a_token_every_route_but_health_and_the_page_needs_it(server, portrait, gate_run):
    gate = server("--token-env", "GATE_TEST_TOKEN", env={"GATE_TEST_TOKEN": "s3cret"})
    jpeg = _jpeg(camera_frame(portrait))
    assert httpx.get(f"{gate.url}/health", timeout=10).status_code == 200
    assert "getUserMedia" in httpx.get(gate.url, timeout=10).text
    for refused in (_post(gate.url, jpeg), httpx.get(f"{gate.url}/events", timeout=10),
                    httpx.get(f"{gate.url}/metrics", timeout=10),
                    httpx.get(f"{gate.url}/events", headers={"Authorization": "Bearer wrong"}, timeout=10)):
        assert refused.status_code == 401 and "gate.token" in refused.json()["error"]
    auth = {"Authorization": "Bearer s3cret"}
    assert _post(gate.url, jpeg, headers=auth).status_code == 200
    assert httpx.get(f"{gate.url}/events", headers=auth, timeout=10).status_code == 200
    health = httpx.get(f"{gate.url}/health", timeout=10).text
    assert str(gate_run["bundle"]) not in health and "s3cret" not in health and str(PROJECT_ROOT) not in health


@pytest.mark.parametrize("host, token, refusal", [
    ("0.0.0.0", None, "set gate.token"), ("192.168.1.20", None, "set gate.token"),
    ("gate.example.org", None, "is not an IP address"), ("0.0.0.0", "env:NOT_SET_ANYWHERE", "is not set"),
])
def test_serve_refuses_an_open_address_without_a_token(host, token, refusal):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.gate.server import gate_token

    cfg = load_config("configs/demo.yaml", [f"gate.token={token}" if token else "gate.token=null"])
    with pytest.raises(ConfigError, match=refusal):
        gate_token(cfg, host)


def test_serve_takes_loopback_without_a_token_and_an_open_address_with_one(monkeypatch):
    from pipeline.config import load_config
    from pipeline.gate.server import gate_token

    assert gate_token(load_config("configs/demo.yaml"), "127.0.0.1") is None
    assert gate_token(load_config("configs/demo.yaml"), "::1") is None
    monkeypatch.setenv("GATE_TOKEN", "t0ken")
    assert gate_token(load_config("configs/demo.yaml", ["gate.token=env:GATE_TOKEN"]), "0.0.0.0") == "t0ken"


def test_kept_thumbnails_are_owner_only_and_pruned_after_their_days(gate, portrait, tmp_path, monkeypatch):
    events = EventLog(tmp_path / "gate" / "events.jsonl", thumbnails=True, keep_days=7)
    monkeypatch.setattr(gate, "predict", _no_mask((500, 150, 700, 400)))
    with TestClient(_app(gate, events)) as client:
        event = client.post("/predict", files={"file": ("f.jpg", _jpeg(camera_frame(portrait)), "image/jpeg")}
                            ).json()["events"][0]
        kept = events.thumbnail_dir / event["thumbnail"]
        assert kept.stat().st_mode & 0o777 == 0o600 and kept.read_bytes()[:2] == b"\xff\xd8"
        assert client.get(f"/events/thumbnail/{event['thumbnail']}").content == kept.read_bytes()
        assert client.get("/events/thumbnail/..%2Fevents.jsonl").status_code == 404
    old = time.time() - 8 * 86400
    os.utime(kept, (old, old))
    assert events.prune() == 1 and not kept.exists()


def test_the_events_log_is_capped(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", log_mb=0.001)  # about 1 KB
    image = np.zeros((720, 1280, 3), np.uint8)
    for number in range(40):  # forty people, far apart in time: forty events
        log.observe(image, _no_mask((500, 150, 700, 400))(image), now=1000.0 + 10 * number)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1"]
    assert all(p.stat().st_size < 2048 for p in tmp_path.iterdir())


class _Trickler(BaseHTTPRequestHandler):
    def do_POST(self):  # answers a byte a second: under a per-read timeout it never times out
        self.rfile.read(int(self.headers["content-length"]))
        for byte in b"HTTP/1.1 204 No Content\r\n\r\n":
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(1.0)

    def log_message(self, *args):
        pass


def test_a_trickling_webhook_is_given_up_at_one_deadline_and_counted(gate, portrait, tmp_path, monkeypatch):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Trickler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        events = EventLog(tmp_path / "events.jsonl", webhook=f"http://127.0.0.1:{receiver.server_port}/hook",
                          webhook_timeout_s=1.5)
        monkeypatch.setattr(gate, "predict", _no_mask((500, 150, 700, 400)))
        with TestClient(_app(gate, events)) as client:
            client.post("/predict", files={"file": ("f.jpg", _jpeg(camera_frame(portrait)), "image/jpeg")})
            deadline = time.time() + 10  # a per-read timeout would take 27 s (27 bytes, one a second)
            while not events.delivered and time.time() < deadline:
                time.sleep(0.05)
            assert list(events.delivered) == [(1, "failed: TimeoutError")]
            assert client.get("/health").json()["webhook"] == {"configured": True, "delivered": 0, "failed": 1,
                                                               "dropped": 0}
            assert 'maskfold_gate_webhook_total{outcome="failed"} 1.0' in client.get("/metrics").text
    finally:
        receiver.shutdown()


def test_serve_picks_up_a_newly_exported_bundle_between_frames(gate_run, portrait, tmp_path):
    from pipeline.config import with_values
    from pipeline.stages import export

    out = tmp_path / "run"
    shutil.copytree(gate_run["tmp"] / "run", out, symlinks=True)
    cfg = with_values(gate_run["cfg"], {"output.dir": str(out)})
    state = GateState(Gate(out / "bundle"), EventLog(None), Limits(LIMIT), reload_every_s=0.0)
    jpeg = _jpeg(camera_frame(portrait))
    with TestClient(create_app(state)) as client:
        assert client.post("/predict", files={"file": ("f.jpg", jpeg, "image/jpeg")}).status_code == 200
        before = client.get("/health").json()["bundle"]
        export.run(with_values(cfg, {"gate.folds": [0]}), force=True)  # one model per backbone: another bundle
        assert client.post("/predict", files={"file": ("f.jpg", jpeg, "image/jpeg")}).status_code == 200
        after = client.get("/health").json()["bundle"]
    assert before["stamp"] and after["stamp"] != before["stamp"] and after["reloads"] == 1
    assert len(state.gate.manifest["ensemble"]["members"]) == 2  # 2 backbones x fold 0, no longer 2 x 2
