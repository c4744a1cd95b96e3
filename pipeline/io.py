"""Atomic writes (with the fault hooks tests use), artifact metadata, and worker processes that die with their stage."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import yaml

from pipeline.errors import ArtifactError, MissingArtifactError, WriteError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write to a temp file in the same folder, then rename: no reader sees half a file.

    The temp file is named .<name>.<pid>.<random>.tmp; a process killed before its rename leaves one
    behind, and the next write into that folder (by a process whose pid is not the dead one's) removes it.
    """
    path = Path(path)
    tmp = None
    try:
        if _FAULT_HOOKS:
            _fault_point(path, "start")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            if _FAULT_HOOKS:
                _fault_point(path, "during", handle, data)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if _FAULT_HOOKS:
            _fault_point(path, "before")
        os.replace(tmp, path)
        if _FAULT_HOOKS:
            _fault_point(path, "after")
    except OSError as error:
        _remove(tmp)
        raise WriteError(f"cannot write {path}: {error.strerror or error}; "
                         f"its previous version, if any, is intact") from error
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(tmp: str | None) -> None:
    if tmp and os.path.exists(tmp):
        os.unlink(tmp)


_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp$")
_swept: set[str] = set()  # folders this process has already cleaned


def remove_stale_temps(folder) -> list[Path]:
    """Remove the temp files that killed processes left in `folder`, once per folder and process.

    Only files named by atomic_write_bytes whose writer is gone: another live process's temp file is
    its write in progress."""
    folder = str(folder)
    if folder in _swept:
        return []
    _swept.add(folder)
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _TEMP_NAME.match(entry.name) if entry.name.endswith(".tmp") else None
            if match and not _process_alive(int(match["pid"])):
                with contextlib.suppress(FileNotFoundError):  # two processes may sweep one folder
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


# Fault injection for tests/test_faults.py; neither is set in normal use.
#   MASKFOLD_TRACE_WRITES=FILE      append the path of every atomic write to FILE (the points a kill can name)
#   MASKFOLD_KILL_AT=PART:N:MOMENT  SIGKILL this process at the N-th atomic write whose path contains PART:
#                                   "during" (half the temp file written), "before" (the temp file complete,
#                                   not yet renamed) or "after" (renamed into place)
_TRACE_WRITES = os.environ.get("MASKFOLD_TRACE_WRITES", "")
_KILL_AT = os.environ.get("MASKFOLD_KILL_AT", "")
_FAULT_HOOKS = bool(_TRACE_WRITES or _KILL_AT)
_matching_writes = 0


def _fault_point(path: Path, moment: str, handle=None, data: bytes = b"") -> None:
    global _matching_writes
    if moment == "start" and _TRACE_WRITES:
        with open(_TRACE_WRITES, "a") as trace:
            trace.write(f"{path}\n")
    if not _KILL_AT:
        return
    part, n, when = _KILL_AT.rsplit(":", 2)
    if part not in path.as_posix():
        return
    if moment == "start":
        _matching_writes += 1
        return
    if moment != when or _matching_writes != int(n):
        return
    if handle is not None:  # a torn temp file, as a kill in the middle of write() leaves it
        handle.write(data[:len(data) // 2])
        handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:
        return True


def yaml_text(obj) -> str:
    """safe_dump that writes a value shared by two keys out twice: a config file may hold no alias
    (pipeline/config.py refuses them)."""
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False)


def atomic_write_yaml(path, obj) -> Path:
    return atomic_write_text(path, yaml_text(obj))


def atomic_save_npz(path, **arrays) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_torch_save(path, obj) -> Path:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def torch_load(path):
    """Checkpoints hold tensors, numbers, strings and lists only: never unpickle code. A checkpoint whose job
    recorded its digest must still have it; a damaged or replaced one is named with the command that remakes it."""
    import torch

    from pipeline.artifacts import bytes_digest, checkpoint_record  # artifacts imports this module

    recorded, remedy = checkpoint_record(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as error:
        raise MissingArtifactError(f"{path}: not found; remake it: {remedy}") from error
    except OSError as error:
        raise ArtifactError(f"{path}: cannot read checkpoint ({error.strerror or error}); "
                            f"remake it: {remedy}") from error
    if recorded is not None and bytes_digest(data) != recorded:
        raise ArtifactError(f"{path}: not the checkpoint its job saved (its digest differs from the one in the job's "
                            f"stamp): damaged or replaced; remake it: {remedy}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which
        detail = " ".join(str(error).split())
        raise ArtifactError(f"{path}: cannot load checkpoint ({detail[:300]}); remake it: {remedy}") from error


def load_npz(path) -> dict[str, np.ndarray]:
    """The arrays of a table written by atomic_save_npz; a damaged or foreign file is an error naming it."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("an .npy array, not an .npz archive")
        with data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError as error:
        raise MissingArtifactError(f"{path}: not found") from error
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # numpy words a pickle or a bad header so
        raise ArtifactError(f"{path}: not a readable table ({str(error).strip()[:200]}); "
                            f"re-run the stage that wrote it with --force") from error


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stable_hash(obj, length: int = 12) -> str:
    text = json.dumps(obj, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


_URL_PASSWORD = re.compile(r"(?P<user>\b[a-z][a-z0-9+.-]*://[^/:@\s]*):[^/\s]*@", re.IGNORECASE)
_URL_QUERY = re.compile(r"(?P<url>\bhttps?://[^\s?#]+)\?[^\s#]+", re.IGNORECASE)
# a query or DSN parameter whose name says it holds a secret: ?password=, &sslpassword=, ;pwd=, ?access_token=, ...
_SECRET_PARAMETER = re.compile(r"(?P<name>(?:^|[?&;\s])[\w.-]*(?:pass|pwd|secret|token|credential|api_?key)[\w.-]*)="
                               r"[^&;\s#]*", re.IGNORECASE)


def redacted(value):
    """A copy with every password a URL or connection string may carry replaced by ***: the userinfo's
    (`scheme://user:password@host`), the value of every parameter named like a secret (`?password=`,
    `&PWD=`, `;sslpassword=`, `?token=`, case-insensitive) and the whole query of every http(s) URL.

    Artifacts and logs never hold a secret: the config's storage URL may carry a database password, a
    webhook URL a token."""
    if isinstance(value, str):
        value = _SECRET_PARAMETER.sub(r"\g<name>=***", _URL_PASSWORD.sub(r"\g<user>:***@", value))
        return _URL_QUERY.sub(r"\g<url>?***", value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(item) for item in value)
    return value


def provenance(cfg: dict, seed: int, data_fingerprint: str) -> dict:
    """What every report embeds: the resolved config (redacted), the seed, the data fingerprint and the git commit."""
    return {"config": redacted(cfg), "seed": seed, "data_fingerprint": data_fingerprint, "git_commit": git_commit()}


def write_provenance(folder, cfg: dict, seed: int, extra: dict | None = None) -> None:
    """Every artifact folder holds its resolved config, seed, git commit (and whatever else it depends on)."""
    folder = Path(folder)
    atomic_write_yaml(folder / "config.yaml", redacted(cfg))
    meta = {"seed": seed, "git_commit": git_commit(), **(extra or {})}
    atomic_write_json(folder / "meta.json", meta)


def parallel(workers: int, **options):
    """joblib.Parallel over `workers` loky processes that exit within a second of their stage's death.

    loky keeps idle workers for minutes and never notices a parent killed with kill -9: a killed stage's
    workers would live on, and a killed synth's could go on writing images into the folder its re-run clears.
    """
    from joblib import Parallel

    if workers <= 1:
        return Parallel(n_jobs=1, backend="sequential", **options)
    return Parallel(n_jobs=workers, backend="loky", initializer=_exit_with_parent, initargs=(os.getpid(),), **options)


def _exit_with_parent(parent: int) -> None:
    """Runs in each worker: a thread that ends the worker once its parent is gone (it is re-parented)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
