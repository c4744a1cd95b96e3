"""What a run exposes to the network: the Optuna dashboard listens on 127.0.0.1 and nowhere else."""
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna

from pipeline.io import PROJECT_ROOT


def _listening(port: int) -> list[str]:
    """Local addresses ('127.0.0.1', '0.0.0.0', '::', ...) with a socket listening on `port`, from /proc/net."""
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if int(local_port, 16) == port and state == "0A":  # LISTEN
                raw = bytes.fromhex(address)
                if width == 8:
                    found.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.append(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_the_dashboard_listens_on_127_0_0_1_only(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="demo", storage=storage)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pipeline.stages.dashboard", "-c", "configs/demo.yaml",
                               f"tune.storage={storage}", "--port", str(port)], cwd=PROJECT_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        addresses, deadline = [], time.time() + 60
        while not addresses and time.time() < deadline and server.poll() is None:
            addresses = _listening(port)
            time.sleep(0.2)
        assert addresses == ["127.0.0.1"]
    finally:
        server.terminate()
        server.wait(timeout=10)
