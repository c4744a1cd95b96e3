"""torch's OpenMP wait policy, chosen before torch loads: sleep when idle beside a busy process, libgomp's
default on a quiet machine, the user's own setting kept, and the same numbers under either policy."""
from __future__ import annotations

import os
import subprocess
import sys

from pipeline import openmp
from pipeline.io import PROJECT_ROOT

PROBE = "import os, pipeline, torch; print(os.environ.get('OMP_WAIT_POLICY'), '|', os.environ.get('MASKFOLD_OMP_WAIT'))"


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (openmp.CHOICE, *openmp.USER_KEYS)}
    return {**env, **extra}


def _probe(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_busy_elsewhere_means_passive_quiet_means_the_default():
    env = {}
    assert openmp.decide(env, lambda: 1.0) == "passive"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env[openmp.CHOICE].startswith("passive (1.0 cores")
    env = {}
    assert openmp.decide(env, lambda: openmp.BUSY_CORES / 2) == "default"
    assert "OMP_WAIT_POLICY" not in env and env[openmp.CHOICE].startswith("default")
    env = {}
    assert openmp.decide(env, lambda: None) == "default"  # cannot tell (no /proc/stat): libgomp's own


def test_the_users_setting_and_a_parents_choice_are_kept_without_looking():
    def look():
        raise AssertionError("looked at the machine although there was nothing to decide")

    for key, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")):
        env = {key: value}
        assert openmp.decide(env, look) == "user" and env == {key: value}
    env = {openmp.CHOICE: "default (0.0 cores busy elsewhere)"}
    assert openmp.decide(env, look) == "inherited"


def test_a_process_that_never_imports_torch_never_looks():
    out = subprocess.run([sys.executable, "-c", "import os, pipeline.config; print(os.environ.get('MASKFOLD_OMP_WAIT'))"],
                         cwd=PROJECT_ROOT, env=_clean_env(), capture_output=True, text=True, check=True).stdout.strip()
    assert out == "None"


def test_importing_pipeline_beside_a_busy_process_sets_passive_before_torch_loads():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = _probe(_clean_env())
    finally:
        hog.kill()
        hog.wait()
    assert out.startswith("PASSIVE | passive ("), out
    assert _probe(_clean_env(OMP_WAIT_POLICY="ACTIVE")) == "ACTIVE | None"  # the user's, untouched


def test_the_wait_policy_changes_no_result():
    """A small training step's weights, bit for bit, under libgomp's default and under PASSIVE."""
    code = ("import hashlib, torch; torch.set_num_threads(2); torch.manual_seed(0);"
            "m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(),"
            " torch.nn.LazyLinear(18)); x = torch.randn(32, 3, 40, 32); m(x);"
            "opt = torch.optim.SGD(m.parameters(), lr=0.1);"
            "[(opt.zero_grad(), m(x).logsumexp(1).mean().backward(), opt.step()) for _ in range(3)];"
            "print(hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest())")
    digests = {policy: subprocess.run([sys.executable, "-c", code], env=_clean_env(**env), capture_output=True,
                                      text=True, check=True).stdout.strip()
               for policy, env in (("default", {"GOMP_SPINCOUNT": "300000"}), ("passive", {"OMP_WAIT_POLICY": "PASSIVE"}))}
    assert digests["default"] == digests["passive"] and len(digests["default"]) == 64
