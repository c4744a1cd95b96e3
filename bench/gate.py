"""How fast a person at the door gets an answer.

    python bench/gate.py [--bundle runs/demo/bundle] [--frames 60] [--seconds 60] [--clients 8] [--gpu-fast]

On one 1280x720 frame holding the real portrait (matplotlib's), with the bundle's runtime (onnxruntime,
2 threads): per frame, the face finding, the classification by the full ensemble bundle, the
classification by one exported model, and the whole predict (find, crop, classify), each as p50 / p95
milliseconds and frames per second. Then the server (./run.sh serve, its own process on 127.0.0.1)
under N clients posting the frame for S seconds: requests served, errors, p95 latency, the server's
memory (RSS) at start and end. --gpu-fast also times configs/gpu-fast.yaml's ten models (2 backbones x 5
folds, random weights) exported as one graph at their size. Prints a table; --out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def frame() -> np.ndarray:
    from matplotlib import cbook

    portrait = cv2.cvtColor(cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))), cv2.COLOR_BGR2RGB)
    out = np.full((720, 1280, 3), 90, np.uint8)
    small = cv2.resize(portrait, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    out[100:100 + small.shape[0], 400:400 + small.shape[1]] = small
    return out


def timed(fn, frames: int) -> dict:
    fn()  # warm up
    times = []
    for _ in range(frames):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 1), "p95_ms": round(float(np.percentile(times, 95)), 1),
            "fps": round(1000 / float(np.mean(times)), 1)}


def single_model_graph(cfg: dict, backbones: list[str], folds: int, work: Path) -> Path:
    """One ONNX graph of `folds` random-weight copies of each backbone, as export would make it."""
    import torch

    from pipeline.gate.export import EnsembleGraph, _export_graph
    from pipeline.train.model import MaskNet

    torch.manual_seed(0)
    members = [(MaskNet(b, cfg["model"]["head"], image_size=cfg["data"]["image_size"]).eval(), 1 / (len(backbones) * folds))
               for b in backbones for _ in range(folds)]
    path = work / f"graph-{len(members)}.onnx"
    _export_graph(EnsembleGraph(cfg, members, "joint").eval(), path, cfg["data"]["image_size"])
    return path


def graph_timing(path: Path, size, frames: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    crop = np.random.default_rng(0).integers(0, 255, (1, size[1], size[0], 3), dtype=np.uint8)
    return timed(lambda: session.run(None, {"crops": crop}), frames)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def server_load(bundle: Path, jpeg: bytes, clients: int, seconds: float) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tempfile.mkdtemp()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.stages.serve", "-c", "configs/demo.yaml", "--bundle",
                                str(bundle), "--port", str(port), f"output.dir={work}"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        httpx.post(f"{url}/predict", files={"file": ("f.jpg", jpeg, "image/jpeg")}, timeout=30)  # warm up
        start_rss = rss_mb(process.pid)
        latencies, shed, errors, health, stop = [], [], [], [], time.time() + seconds

        def client(number: int):  # as the page does: the next frame after the answer; on 503, Retry-After
            with httpx.Client(timeout=30) as http:
                while time.time() < stop:
                    started = time.perf_counter()
                    try:
                        response = http.post(f"{url}/predict?stream=bench-{number}",
                                             files={"file": ("f.jpg", jpeg, "image/jpeg")})
                    except httpx.HTTPError:
                        errors.append("connection")
                        continue
                    if response.status_code == 200:
                        latencies.append((time.perf_counter() - started) * 1000)
                    elif response.status_code == 503:
                        shed.append(1)
                        time.sleep(float(response.headers.get("retry-after", 1)))
                    else:
                        errors.append(response.status_code)

        def supervisor():  # a health check every 100 ms, as a supervisor with a short timeout would
            with httpx.Client(timeout=10) as http:
                while time.time() < stop:
                    started = time.perf_counter()
                    try:
                        http.get(f"{url}/health")
                        health.append((time.perf_counter() - started) * 1000)
                    except httpx.HTTPError:
                        health.append(float("inf"))
                    time.sleep(0.1)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        threads.append(threading.Thread(target=supervisor))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counted = httpx.get(f"{url}/health", timeout=10).json()

        def pct(values, q):
            return round(float(np.percentile(values, q)), 1) if values else None

        return {"clients": clients, "seconds": seconds, "served": len(latencies), "shed": len(shed),
                "shed_counted": counted.get("shed"), "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
                "requests_per_s": round(len(latencies) / seconds, 1), "p50_ms": pct(latencies, 50),
                "p95_ms": pct(latencies, 95), "health_p50_ms": pct(health, 50), "health_p95_ms": pct(health, 95),
                "health_max_ms": round(max(health), 1) if health else None,
                "rss_start_mb": start_rss, "rss_end_mb": rss_mb(process.pid)}
    finally:
        process.terminate()
        process.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--gpu-fast", action="store_true")
    parser.add_argument("--min-face", type=int, default=None, help="time the face finder with this smallest face "
                                                                    "(source pixels) instead of the bundle's")
    parser.add_argument("--no-server", action="store_true", help="time the steps only")
    parser.add_argument("--out")
    args = parser.parse_args()
    from pipeline.config import load_config
    from pipeline.data.crop import crop_and_resize
    from pipeline.gate.runtime import Gate

    gate = Gate(args.bundle)
    if args.min_face:
        gate.faces_cfg = {**gate.faces_cfg, "min_face": args.min_face}
    image = frame()
    where = gate.crops(image, "all")
    assert len(where) == 1, f"expected one face in the bench frame, found {len(where)}"
    crop = crop_and_resize(image, where[0]["crop"], gate.size)[None]
    manifest = gate.manifest
    results = {"machine": f"{os.cpu_count()} cores", "bundle": str(args.bundle), "faces": gate.faces_cfg,
               "models": len(manifest["ensemble"]["members"]), "input": manifest["input"]["size"],
               "tta": manifest["tta"]["views"]}
    results["find_faces"] = timed(lambda: gate.find_faces(image), args.frames)
    results["classify_bundle"] = timed(lambda: gate.classify(crop), args.frames)
    results["predict_end_to_end"] = timed(lambda: gate.predict(image), args.frames)
    from pipeline.data.blazeface import BlazeFace, onnx_model

    with tempfile.TemporaryDirectory() as tmp:  # faces.finder: blazeface, converted here from the wheel
        blaze = BlazeFace(onnx_model(tmp))
    found = blaze.find(image, 0.5, gate.faces_cfg["min_face"])
    assert len(found) == 1, f"blazeface: expected one face in the bench frame, found {len(found)}"
    results["find_faces_blazeface"] = timed(lambda: blaze.find(image, 0.5, gate.faces_cfg["min_face"]), args.frames)
    gate.blazeface, gate.faces_cfg = blaze, {**gate.faces_cfg, "blazeface_min_score": 0.5}
    results["predict_end_to_end_blazeface"] = timed(lambda: gate.predict(image), args.frames)
    gate.blazeface = None
    demo = load_config("configs/demo.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        one = single_model_graph(demo, [manifest["ensemble"]["members"][0]["backbone"]], 1, Path(tmp))
        results["classify_one_model"] = graph_timing(one, gate.size, args.frames)
        if args.gpu_fast:
            fast = load_config("configs/gpu-fast.yaml")
            graph = single_model_graph(fast, fast["model"]["backbones"], fast["folds"]["k"], Path(tmp))
            results["gpu_fast_ten_models"] = {"backbones": fast["model"]["backbones"], "input": fast["data"]["image_size"],
                                              **graph_timing(graph, fast["data"]["image_size"], max(args.frames // 4, 5))}
    results["server"] = None if args.no_server else server_load(Path(args.bundle), cv2.imencode(".jpg", image[:, :, ::-1])[1].tobytes(),
                                    args.clients, args.seconds)
    print(f"\nthe gate on {results['machine']}: bundle of {results['models']} models at {results['input']}, "
          f"TTA {results['tta']}, one face in a 1280x720 frame")
    print(f"{'step':<26} {'p50 ms':>8} {'p95 ms':>8} {'fps':>7}")
    for key in ("find_faces", "find_faces_blazeface", "classify_bundle", "classify_one_model", "gpu_fast_ten_models",
                "predict_end_to_end", "predict_end_to_end_blazeface"):
        if key in results:
            r = results[key]
            print(f"{key:<26} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['fps']:>7}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    s = results["server"]
    if s is None:
        return
    print(f"server, {s['clients']} clients x {s['seconds']:.0f} s: {s['served']} frames answered ({s['requests_per_s']}/s), "
          f"p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms; {s['shed']} shed with 503 ({s['shed_counted']} counted in "
          f"/health); {s['errors']} other errors {s['error_kinds']}; /health p50 {s['health_p50_ms']} ms, p95 "
          f"{s['health_p95_ms']} ms (target <= 50), max {s['health_max_ms']} ms; RSS {s['rss_start_mb']} -> "
          f"{s['rss_end_mb']} MB (target: growth < 50)")


if __name__ == "__main__":
    main()
