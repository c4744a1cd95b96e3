"""Where every artifact lives, and the one rule for "skip if done, refuse if stale".

An artifact is a folder (or file) a stage makes from known inputs. Its stamp, written last, holds
the identity it was made from (config sections, data fingerprint, the tokens of its inputs) and a
token of its own (identity plus the digests of its output files). A stage asks `state()`:

    missing  no stamp: never made, or a run was killed before it finished
    stale    a stamp made from other inputs (the message lists what changed)
    fresh    up to date: skip it

Before a stage rewrites any file of an artifact it calls `invalidate()`, so a run killed halfway
never leaves an old stamp vouching for new files. The stamp records each output's size and digest; an
artifact may ask `state()` to compare them (`check_outputs`), so a truncated or replaced output is stale,
not up to date (a checkpoint's digest is checked where it is loaded: see `checkpoint_record`).
Downstream identities hold upstream tokens: a retrained checkpoint makes every inference table made
from the old one stale.

No torch here: oof and ensemble read only probability tables and start in a second.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ArtifactError, MissingArtifactError, StaleArtifactError, WriteError
from pipeline.io import atomic_write_json, git_commit, stable_hash

STAMP = "done.json"

# file names inside a (backbone, fold) job's folders
BEST, LAST, VAL_PROBS, METRICS = "best.pt", "last.pt", "val_probs.npz", "metrics.jsonl"
EVAL_PROBS, VAL_PROBS_TTA = "eval_probs.npz", "val_probs_tta.npz"
# sections of the config a training job depends on; locations and worker counts are not among them
JOB_SECTIONS = ("data", "faces", "folds", "model", "train", "augment")
JOB_IGNORED = {"data": ("root", "cache_dir", "label_fixes", "num_workers"), "faces": ("dir", "sheet_people"),
               "folds": ("dir",), "train": ("folds", "threads", "checkpoint_every")}
BOXES, FACES_REPORT, CONTACT_SHEET = "boxes.csv", "report.md", "contact_sheet.png"


def output_dir(cfg: dict, *parts: str) -> Path:
    return Path(cfg["output"]["dir"]).joinpath(*parts)


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def identity_changes(before: dict, now: dict, most: int = 4) -> str:
    """'train.lr 0.1 -> 0.02; ...' for the keys whose values differ."""
    old, new = _flatten(before), _flatten(now)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    text = "; ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:most])
    return text + (f"; and {len(changed) - most} more" if len(changed) > most else "")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def bytes_digest(data: bytes) -> str:
    """file_digest of a file's bytes already read."""
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class Artifact:
    """One stage output with its stamp. `what` names it in messages; `remedy` is the command that remakes it."""
    what: str
    folder: Path
    identity: dict
    remedy: str
    stamp_name: str = STAMP
    outputs: tuple[str, ...] = field(default_factory=tuple)
    shared_folder: bool = False  # the artifact is files in a folder others share (folds/, output.dir)
    cache_dir: str | None = None  # where pixel manifests are kept, so a stale message can name changed images
    # what state() compares of each output with its stamp: "size" (cheap: a truncated or other file), "digest"
    # (its bytes: for small files, e.g. one edited by hand), or "" (only that it exists)
    check_outputs: str = ""

    @property
    def key(self) -> str:
        return stable_hash(self.identity)

    @property
    def stamp_path(self) -> Path:
        return self.folder / self.stamp_name

    def path(self, name: str) -> Path:
        return self.folder / name

    def read_stamp(self) -> dict | None:
        try:
            stamp = json.loads(self.stamp_path.read_text())
            if not isinstance(stamp, dict):
                raise ValueError(f"a JSON {type(stamp).__name__}, not an object")
            return stamp
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ArtifactError(f"{self.what}: stamp {self.stamp_path} is unreadable ({str(error)[:200]}); "
                                f"delete it and run: {self.remedy}") from error

    def state(self) -> tuple[str, str]:
        """('fresh' | 'stale' | 'missing', a one-line message in the one format every stage prints)."""
        stamp = self.read_stamp()
        if stamp is None:
            return "missing", f"{self.what}: missing ({self.stamp_path} not found); run: {self.remedy}"
        if stamp.get("key") != self.key:
            changes = identity_changes(stamp.get("identity", {}), self.identity) or "unknown inputs"
            changes += self._changed_images(stamp.get("identity", {}))
            return "stale", f"{self.what}: stale, made from other inputs ({changes}); re-run: {self.remedy}"
        gone = [name for name in self.outputs if not self.path(name).exists()]
        if gone:
            return "missing", (f"{self.what}: incomplete ({', '.join(str(self.path(n)) for n in gone)} missing); "
                               f"run: {self.remedy}")
        changed = [problem for name in self.outputs if (problem := self._changed_output(stamp, name))]
        if changed:
            return "stale", f"{self.what}: {'; '.join(changed)}; re-run: {self.remedy}"
        return "fresh", f"{self.what}: up to date ({self.folder})"

    def _changed_output(self, stamp: dict, name: str) -> str | None:
        """What differs between an output file and its stamp's record of it (check_outputs), or None."""
        path = self.path(name)
        sizes, digests = stamp.get("sizes") or {}, stamp.get("outputs") or {}
        if self.check_outputs and name in sizes and path.stat().st_size != sizes[name]:
            return (f"{path} is {path.stat().st_size} bytes, {sizes[name]} when it was made: "
                    f"truncated, damaged or replaced since")
        if self.check_outputs == "digest" and name in digests and file_digest(path) != digests[name]:
            return f"{path} changed after it was made (its digest differs from its stamp's): edited or damaged"
        return None

    def _changed_images(self, before: dict) -> str:
        """'; images: train/images/x/mask1.jpg changed' for each pixel key that differs (pipeline/data/pixels.py)."""
        if self.cache_dir is None:
            return ""
        from pipeline.data.pixels import changed_files

        old, new = _flatten(before), _flatten(self.identity)
        named = [changed_files(self.cache_dir, old[k], new[k]) for k in sorted(new)
                 if k.split(".")[-1] == "pixels" and k in old and old[k] != new[k]]
        named = [text for text in named if text]
        return f"; images: {'; '.join(named)}" if named else ""

    def is_fresh(self) -> bool:
        return self.state()[0] == "fresh"

    def require(self) -> dict:
        """The stamp of a fresh artifact; a missing or stale one is an error naming the stage to re-run."""
        status, message = self.state()
        if status == "missing":
            raise MissingArtifactError(message)
        if status == "stale":
            raise StaleArtifactError(message)
        return self.read_stamp()

    def refuse_other_inputs(self, recorded_key: str | None, source: Path) -> None:
        """A half-made artifact (e.g. last.pt) must have been started from these same inputs."""
        if recorded_key != self.key:
            raise StaleArtifactError(f"{self.what}: {source} was made from other inputs (key {recorded_key}, "
                                     f"now {self.key}); refusing to resume it. Use another output.dir, "
                                     f"or --force to discard it")

    @property
    def lock_path(self) -> Path:
        """Beside the folder, not in it (`--force` may delete the folder while the lock is held); inside a
        shared folder (folds/, output.dir) for an artifact that is one file there."""
        if self.shared_folder:
            return self.folder / f".{self.stamp_name}.lock"
        return self.folder.parent / f".{self.folder.name}.lock"

    @contextlib.contextmanager
    def lock(self):
        """Hold the artifact for one process; a second is refused, naming the holder.

        flock, by hand: the kernel drops it when its process dies, so a lock left by a killed run
        never blocks the next one; the `filelock` package cannot say which process holds a lock.
        """
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_path, "a+b", buffering=0)  # unbuffered: a full disk fails at write, here
        except OSError as error:
            raise WriteError(f"{self.what}: cannot create its lock file {self.lock_path}: "
                             f"{error.strerror or error}") from error
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read(300).decode(errors="replace").strip() or "another process"
                raise ArtifactError(f"{self.what}: {self.folder} is in use by {holder}; wait for it to finish "
                                    f"or stop it, then run again") from None
            handle.seek(0)
            handle.truncate()
            try:
                handle.write(f"process {os.getpid()} ({' '.join(sys.argv)[:200]})\n".encode())
            except OSError as error:
                raise WriteError(f"{self.what}: cannot write its lock file {self.lock_path}: "
                                 f"{error.strerror or error}") from error
            try:
                yield self
            finally:
                handle.seek(0)
                handle.truncate()

    def invalidate(self) -> None:
        """Call before rewriting any output: no stamp may vouch for files that are being replaced."""
        self.stamp_path.unlink(missing_ok=True)

    def seal(self, **summary) -> dict:
        """Write the stamp, last: identity, key, and a token that changes whenever an output file does."""
        digests = {name: file_digest(self.path(name)) for name in self.outputs}
        sizes = {name: self.path(name).stat().st_size for name in self.outputs}
        stamp = {**summary, "key": self.key, "token": stable_hash({"key": self.key, "outputs": digests}),
                 "outputs": digests, "sizes": sizes, "identity": self.identity, "git_commit": git_commit()}
        atomic_write_json(self.stamp_path, stamp)
        return stamp


def output_lock(cfg: dict, name: str):
    """A lock on one stage output under output.dir (e.g. submission.csv + ensemble.json), for stages that
    always recompute: two runs must not interleave their files."""
    return Artifact(what=f"{name} outputs", folder=output_dir(cfg), identity={}, remedy="",
                    stamp_name=name, shared_folder=True).lock()


# ---------------------------------------------------------------- (backbone, fold) jobs

def job_list(cfg: dict) -> list[tuple[str, int]]:
    folds = cfg["train"]["folds"]
    folds = range(cfg["folds"]["k"]) if folds is None else folds
    return [(backbone, int(fold)) for backbone in cfg["model"]["backbones"] for fold in folds]


def safe_name(backbone: str) -> str:
    return backbone.replace("/", "_")


def job_config(cfg: dict, backbone: str) -> dict:
    """The config sections one training job depends on, as that job sees them (one backbone).

    Where files live and how many processes run do not change results: augmentation is seeded per
    sample, not per worker, and the data fingerprint stands for the data itself.
    """
    job = {section: copy.deepcopy(cfg[section]) for section in JOB_SECTIONS}
    if cfg["data"]["crop"]["mode"] == "box":  # margins and the face finder's settings crop nothing then
        job["data"]["crop"].pop("margin")
        job.pop("faces")
    job["model"]["backbones"] = [backbone]
    job["model"]["pretrained_files"] = {k: v for k, v in cfg["model"]["pretrained_files"].items() if k == backbone}
    job["model"]["tasks"] = {k: v for k, v in cfg["model"]["tasks"].items() if k == backbone}
    for section, keys in JOB_IGNORED.items():
        for key in keys:
            job.get(section, {}).pop(key, None)
    return job


def faces_artifact(cfg: dict, image_set: str, pixels: str) -> Artifact:
    """The boxes table of one image set ("train" or "eval"), in a folder named by everything it is made
    from (the pixels, the face finder's settings, the fallback box): runs on the same data share it, and a
    table for other settings never replaces another's."""
    from pipeline.data.faces import settings

    identity = {"image_set": image_set, "pixels": pixels, "faces": settings(cfg),
                "fallback_box": list(cfg["data"]["crop"]["box"])}
    return Artifact(
        what=f"faces table ({image_set} images)",
        folder=Path(cfg["faces"]["dir"]) / f"{image_set}-{stable_hash(identity, length=16)}",
        identity=identity, remedy="./run.sh faces -c CONFIG", outputs=(BOXES,), cache_dir=cfg["data"]["cache_dir"])


def train_artifact(cfg: dict, backbone: str, fold: int, fingerprint: dict) -> Artifact:
    return Artifact(
        what=f"train job {backbone} fold {fold}",
        folder=output_dir(cfg, "train", safe_name(backbone), f"fold{fold}"),
        identity={"config": job_config(cfg, backbone), "data_fingerprint": fingerprint, "fold": fold},
        remedy=_train_remedy(backbone, fold), outputs=(BEST, VAL_PROBS), cache_dir=cfg["data"]["cache_dir"],
        check_outputs="size")  # best.pt can be hundreds of MB: its digest is checked where it is loaded


def _train_remedy(backbone: str, fold) -> str:
    return f"./run.sh train -c CONFIG model.backbones=[{backbone}] train.folds=[{fold}] --force (or another output.dir)"


def checkpoint_record(path) -> tuple[str | None, str]:
    """For a checkpoint file: (the digest its training job's stamp recorded for it, None where there is no
    such record, e.g. last.pt or a job in progress; the command that remakes it)."""
    path = Path(path)
    folder = path.parent
    if path.name not in (BEST, LAST) or not folder.name.startswith("fold") or not folder.name[4:].isdigit():
        return None, "re-run the stage that wrote it with --force"
    stamp = _json_object(folder / STAMP)
    backbone = stamp.get("backbone") or _json_object(folder / "meta.json").get("backbone") or folder.parent.name
    return (stamp.get("outputs") or {}).get(path.name), _train_remedy(backbone, int(folder.name[4:]))


def _json_object(path: Path) -> dict:
    """A JSON object read from `path`; {} where there is none (missing, unreadable, not an object)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def infer_artifact(cfg: dict, backbone: str, fold: int, train_token: str, eval_key: dict) -> Artifact:
    """Eval and TTA'd validation tables of one fold model: made from that checkpoint (its token)."""
    return Artifact(
        what=f"infer tables {backbone} fold {fold}",
        folder=output_dir(cfg, "infer", safe_name(backbone), f"fold{fold}"),
        identity={"train_token": train_token, "tta": list(cfg["infer"]["tta"]), "eval_images": eval_key},
        remedy=f"./run.sh infer -c CONFIG model.backbones=[{backbone}] train.folds=[{fold}]",
        outputs=(EVAL_PROBS, VAL_PROBS_TTA), cache_dir=cfg["data"]["cache_dir"], check_outputs="size")


def require_all(artifacts: list[Artifact], heading: str) -> list[dict]:
    """The stamps of artifacts that must all be fresh; every one that is not is named in one error."""
    stamps, problems, all_missing = [], [], True
    for artifact in artifacts:
        try:
            stamps.append(artifact.require())
        except ArtifactError as error:
            problems.append(str(error))
            all_missing &= isinstance(error, MissingArtifactError)
    if problems:
        kind = MissingArtifactError if all_missing else StaleArtifactError
        raise kind(f"{heading} ({len(problems)} of {len(stamps) + len(problems)}):\n  - " + "\n  - ".join(problems))
    return stamps


def fresh_train_stamps(cfg: dict, backbone: str, fingerprint: dict) -> dict[int, dict]:
    """The stamps of all K folds of one backbone; every missing or stale fold is named at once."""
    folds = range(cfg["folds"]["k"])
    stamps = require_all([train_artifact(cfg, backbone, f, fingerprint) for f in folds],
                         f"backbone {backbone}: folds not usable")
    return dict(zip(folds, stamps))
