"""The gate page in a real browser: Debian's chromium plays a video made from a real photograph as its camera
(--use-file-for-fake-video-capture), the page sends frames to a real server process, and a box and a verdict
appear. The screenshot is kept in runs/test-artifacts/gate_page.png. Skipped where chromium is not installed
(.ci/run installs it)."""
import os
import shutil
import socket
import subprocess
import sys
import time

import cv2
import pytest

from pipeline.io import PROJECT_ROOT
from tests.conftest import camera_frame, wait_for_server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                                                    "(apt-get install chromium chromium-driver)")
ARTIFACT = PROJECT_ROOT / "runs" / "test-artifacts" / "gate_page.png"


def write_y4m(path, frames) -> None:
    """A YUV4MPEG2 video (what chromium's fake camera plays) of RGB frames."""
    height, width = frames[0].shape[:2]
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F5:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            out.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420).tobytes())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("token", [None, "s3cret"], ids=["open", "token"])
def test_the_page_shows_a_box_and_a_verdict_for_a_face_in_the_camera(gate_run, portrait, tmp_path, token):
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service

    video = tmp_path / "camera.y4m"
    write_y4m(video, [camera_frame(portrait, x=400 + 10 * i) for i in range(5)])
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.serve", "-c", "configs/demo.yaml", "--bundle", str(gate_run["bundle"]),
         "--port", str(port), f"output.dir={tmp_path / 'run'}", *(["gate.token=env:GATE_TEST_TOKEN"] if token else [])],
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **({"GATE_TEST_TOKEN": token} if token else {})})
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={video}", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = None
    try:
        assert wait_for_server(f"http://127.0.0.1:{port}")
        os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for drivers online
        driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
        driver.get(f"http://127.0.0.1:{port}/")
        faces, deadline, prompts = None, time.time() + 60, 0
        while time.time() < deadline:
            if token:  # the page asks for the token once, at its first refused call
                try:
                    alert = driver.switch_to.alert
                    alert.send_keys(token)
                    alert.accept()
                    prompts += 1
                except NoAlertPresentException:
                    pass
            faces = driver.execute_script("return document.getElementById('verdict').dataset.faces")
            if faces and int(faces) >= 1:
                break
            time.sleep(0.3)
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACT))
        assert faces and int(faces) == 1, driver.execute_script("return document.getElementById('status').textContent")
        verdict = driver.execute_script("return document.getElementById('verdict')")
        assert verdict.text in ("MASK OK", "WEAR IT PROPERLY", "NO MASK")
        assert verdict.get_attribute("class") in ("ok", "incorrect", "no_mask")
        drawn = driver.execute_script(
            "const c = document.getElementById('overlay'); const d = c.getContext('2d').getImageData(0, 0, c.width,"
            " c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return [c.width, n];")
        assert drawn[0] == 1280 and drawn[1] > 500  # the box and its label are painted over the video
        assert prompts == (1 if token else 0)
        banner = driver.find_element("id", "banner")  # the demo's models never saw a real face, and say so
        assert banner.is_displayed() and "generated demo faces" in banner.text
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=20)
