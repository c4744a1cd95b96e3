"""The ensemble of a finished run as one ONNX graph plus a manifest: the bundle, the model's only way out
of the repository (pipeline/gate/runtime.py loads it without torch).

    graph ensemble.onnx   uint8 RGB crops (batch, h, w, 3), batch dynamic -> (batch, 26) probabilities:
                          mask 3 | gender 2 | age 3 | joint 18. Inside: the training normalisation, every
                          TTA view of infer.tta, every fold of every backbone (fold mean), the ensemble's
                          backbone weights and its combine rule (joint or heads), as the ensemble stage does
    mtcnn/*.onnx          the face finder (pipeline/data/mtcnn.py)
    bundle.json           classes, heads, input size, normalisation, crop rule, face finder settings, TTA,
                          members and weights, the files' digests, and provenance

The graph is exported with timm's helper (timm.utils.onnx.onnx_export: TorchScript exporter, dynamic
batch axis, ONNX checker), then checked against the torch module on real crops.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline import labels
from pipeline.artifacts import BEST, Artifact, file_digest, output_dir, require_all, train_artifact
from pipeline.data.crop import crop_rule
from pipeline.data.faces import SETTINGS, nets_folder
from pipeline.data import blazeface
from pipeline.data.mtcnn import NETS, export_nets
from pipeline.errors import ArtifactError
from pipeline.evaluate.tables import ENSEMBLE_REPORT, ensemble_artifact
from pipeline.gate.runtime import FORMAT, VERSION, class_names
from pipeline.io import atomic_write_bytes, atomic_write_json, git_commit, redacted, stable_hash, torch_load
from pipeline.train.augment import Normalize
from pipeline.train.model import build_model
from pipeline.train.views import tta_views

GRAPH, MANIFEST = "ensemble.onnx", "bundle.json"
BLAZEFACE = f"faces/{blazeface.ONNX}"  # with faces.finder: blazeface
OUTPUT_COLUMNS = {"mask": (0, 3), "gender": (3, 5), "age": (5, 8), "joint": (8, 26)}  # slices of the output


class EnsembleGraph(nn.Module):
    """uint8 NHWC crops -> the ensemble's probabilities, exactly the infer + ensemble stages' arithmetic."""

    def __init__(self, cfg: dict, members: list[tuple[nn.Module, float]], combine: str):
        super().__init__()
        self.normalize = Normalize(cfg, torch.device("cpu"))
        self.models = nn.ModuleList(model for model, _ in members)
        # constants of the graph: one weight per member, or (combine: heads) one per head it predicts
        self.weights = [{h: float(w[h]) for h in w} if isinstance(w, dict) else float(w) for _, w in members]
        self.head_kinds = [model.head_kind for model, _ in members]
        self.heads = [model.heads for model, _ in members]
        self.tta = list(cfg["infer"]["tta"])
        self.combine = combine

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        views = tta_views(self.normalize(crops), self.tta)
        tables = []
        for model, kind, heads in zip(self.models, self.head_kinds, self.heads):
            probs = [labels.probabilities(model(view), kind, heads) for view in views]
            tables.append({key: sum(p[key] for p in probs) / len(probs) for key in probs[0]})
        if self.combine == "joint":
            joint = sum(w * t["joint"] for w, t in zip(self.weights, tables))
            heads = labels.heads_from_joint(joint)
        else:
            heads = {}
            for h in labels.HEADS:  # each head over the members that predict it, renormalised as combine() does
                votes = [(w[h] if isinstance(w, dict) else w, t[h]) for w, t in zip(self.weights, tables) if h in t]
                total = sum(w for w, _ in votes)
                heads[h] = sum(w / total * t for w, t in votes if w > 0)
            joint = labels.joint_from_heads(heads["mask"], heads["gender"], heads["age"])
        return torch.cat([heads["mask"], heads["gender"], heads["age"], joint], dim=1)


def bundle_artifact(cfg: dict, train_tokens: dict, ensemble_report: dict, ensemble_token: str) -> Artifact:
    identity = {"train_tokens": train_tokens, "ensemble": ensemble_token, "weights": ensemble_report["weights"],
                "decision": _decision(ensemble_report),
                "combine": ensemble_report["combine"], "tta": list(cfg["infer"]["tta"]), "crop": crop_rule(cfg),
                "faces": {key: cfg["faces"][key] for key in SETTINGS}, "augment": {k: cfg["augment"][k] for k in ("mean", "std")}}
    finder = (BLAZEFACE,) if cfg["faces"]["finder"] == "blazeface" else ()
    return Artifact(what="bundle", folder=output_dir(cfg, "bundle"), identity=identity,
                    remedy="./run.sh export -c CONFIG",
                    outputs=(GRAPH, MANIFEST, *(f"mtcnn/{n}.onnx" for n in NETS), *finder))


def _decision(report: dict) -> dict:
    """The ensemble's decision rule: the argmax, or per-class offsets on the log-probabilities."""
    decision = report.get("decision", {})
    offsets = decision.get("offsets") if decision.get("rule") == "offsets" else None
    return {"rule": "offsets" if offsets else "argmax", "offsets": offsets}


def exported_folds(cfg: dict) -> list[int]:
    """The fold models a bundle holds per backbone: gate.folds, or every fold."""
    chosen = cfg["gate"]["folds"]
    return list(range(cfg["folds"]["k"])) if chosen is None else [int(f) for f in chosen]


def _members(cfg: dict, report: dict, stamps: dict) -> list[tuple[nn.Module, float, str, int]]:
    """Every exported fold model (gate.folds) of every backbone with its share of the vote: backbone weight / folds."""
    members = []
    folds = exported_folds(cfg)
    k = len(folds)
    for backbone in cfg["model"]["backbones"]:
        for fold in folds:
            model = build_model(cfg, backbone, for_inference=True)
            model.load_state_dict(torch_load(stamps[(backbone, fold)].path(BEST))["model"])
            weight = report["weights"][backbone]
            weight = {h: w / k for h, w in weight.items()} if isinstance(weight, dict) else weight / k
            members.append((model.eval(), weight, backbone, fold))
    return members


def export_bundle(cfg: dict, fingerprint: dict, eval_key: dict, sample_crops: np.ndarray, force: bool = False) -> Path:
    """Write <output.dir>/bundle/ from the run's fresh checkpoints and the ensemble fitted on their inference tables;
    `sample_crops` (uint8 NHWC, a few real crops) check the graph against the torch module. Returns the folder.

    The bundle is written whole into a new version folder, bundle-<key>-<time>/, and `bundle` (a symbolic link)
    is switched to it in one rename: a gate loading it meanwhile sees the old version or the new one, never a mix.
    The version before stays (a gate may be loading it); older ones are removed."""
    ensemble = ensemble_artifact(cfg, fingerprint, eval_key).require()  # stale after a retrain and re-infer
    report_path = output_dir(cfg, ENSEMBLE_REPORT)
    report = json.loads(report_path.read_text())
    if sorted(report["weights"]) != sorted(cfg["model"]["backbones"]):
        raise ArtifactError(f"export: {report_path} holds weights for {sorted(report['weights'])}, the config's "
                            f"backbones are {cfg['model']['backbones']}; re-run: ./run.sh ensemble -c CONFIG")
    jobs = {(b, f): train_artifact(cfg, b, f, fingerprint) for b in cfg["model"]["backbones"]
            for f in exported_folds(cfg)}
    stamps = require_all(list(jobs.values()), "fold checkpoints not usable, run the train stage first")
    tokens = {f"{b} fold {f}": s["token"] for (b, f), s in zip(jobs, stamps)}
    link = bundle_artifact(cfg, tokens, report, ensemble["token"])
    with link.lock():
        if link.is_fresh() and not force:
            print(f"[export] {link.state()[1]}; skipping (--force to export again)")
            return link.folder
        artifact = dataclasses.replace(link, folder=link.folder.parent / f"bundle-{link.key[:10]}-{time.time_ns()}")
        members = _members(cfg, report, jobs)
        graph = EnsembleGraph(cfg, [(m, w) for m, w, _, _ in members], report["combine"]).eval()
        size = cfg["data"]["image_size"]
        _export_graph(graph, artifact.path(GRAPH), size)
        parity = _check_graph(graph, artifact.path(GRAPH), sample_crops)
        nets = export_nets(nets_folder(cfg["faces"]))
        for name in NETS:
            atomic_write_bytes(artifact.path(f"mtcnn/{name}.onnx"), nets[name].read_bytes())
        if cfg["faces"]["finder"] == "blazeface":  # converted once from the wheel's .tflite into faces.dir
            converted = blazeface.onnx_model(Path(cfg["faces"]["dir"]) / "blazeface")
            atomic_write_bytes(artifact.path(BLAZEFACE), converted.read_bytes())
        manifest = _manifest(cfg, report, members, fingerprint, artifact)
        atomic_write_json(artifact.path(MANIFEST), manifest)
        artifact.seal(parity_max_abs=parity)
        switch_bundle(link.folder, artifact.folder)
    print(f"[export] {link.folder} -> {artifact.folder.name}: {len(members)} models in one graph, {size[0]}x{size[1]} input, TTA "
          f"{cfg['infer']['tta']}; onnxruntime vs torch on {len(sample_crops)} crops: max |diff| {parity:.2e}")
    return artifact.folder


def switch_bundle(link: Path, version: Path) -> None:
    """Point `link` at `version` (a sibling folder) in one rename; keep the version it pointed at before, remove
    older ones. A `link` that is still a plain folder (an export before versions) is moved aside first, once."""
    temporary = link.parent / f".{link.name}.link-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    os.symlink(version.name, temporary)
    previous = link.resolve() if link.exists() else None
    if link.exists() and not link.is_symlink():
        previous = link.parent / f"{link.name}-{time.time_ns()}-unversioned"
        os.replace(link, previous)
    os.replace(temporary, link)  # atomic: a reader resolves the old target or the new one
    keep = {version.resolve(), previous.resolve() if previous else None}
    for old in link.parent.glob(f"{link.name}-*"):
        if old.is_dir() and not old.is_symlink() and old.resolve() not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _export_graph(graph: nn.Module, path: Path, size) -> None:
    from timm.utils.onnx import onnx_export

    example = torch.randint(0, 256, (2, size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tmp = path.parent / f".{path.name}.export"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    onnx_export(copy.deepcopy(graph), str(tmp), example_input=example, input_names=["crops"],
                output_names=["probabilities"], opset=17, check=True)
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()


def _check_graph(graph: nn.Module, path: Path, crops: np.ndarray) -> float:
    """Max |onnxruntime - torch| over the sample crops; over 1e-4 the export is refused."""
    import onnxruntime as ort

    with torch.no_grad():
        expected = graph(torch.from_numpy(np.ascontiguousarray(crops))).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"crops": np.ascontiguousarray(crops)})[0]
    worst = float(np.abs(got - expected).max()) if len(crops) else 0.0
    if worst > 1e-4:
        raise ArtifactError(f"export: {path} differs from the torch ensemble by {worst:.2e} (> 1e-4) on real crops")
    return worst


def _rounded(weight):
    return {h: round(w, 8) for h, w in weight.items()} if isinstance(weight, dict) else round(weight, 8)


TRAINED_ON_DEMO = "generated demo faces"


def _manifest(cfg: dict, report: dict, members, fingerprint: dict, artifact: Artifact) -> dict:
    files = [GRAPH, *(f"mtcnn/{n}.onnx" for n in NETS), *([BLAZEFACE] if cfg["faces"]["finder"] == "blazeface" else [])]
    return {
        "format": FORMAT, "version": VERSION,
        "classes": class_names(),
        "heads": {"mask": list(labels.MASK_NAMES), "gender": [labels.GENDER_NAMES[g] for g in (0, 1)],
                  "age": list(labels.AGE_NAMES)},
        "outputs": {key: list(span) for key, span in OUTPUT_COLUMNS.items()},
        "input": {"size": list(cfg["data"]["image_size"]), "layout": "NHWC uint8 RGB",
                  "normalisation": {"mean": cfg["augment"]["mean"], "std": cfg["augment"]["std"], "in_graph": True}},
        "crop": crop_rule(cfg),
        "faces": {key: cfg["faces"][key] for key in SETTINGS if key != "person_box"},
        "max_image_pixels": cfg["data"]["max_image_pixels"],
        "tta": {"views": list(cfg["infer"]["tta"]), "in_graph": True},
        "ensemble": {"combine": report["combine"], "backbone_weights": report["weights"], "in_graph": True,
                     "members": [{"backbone": b, "fold": f, "weight": _rounded(w)} for _, w, b, f in members]},
        "decision": _decision(report),
        "graph": GRAPH, "mtcnn": {name: f"mtcnn/{name}.onnx" for name in NETS},
        **({"blazeface": BLAZEFACE} if cfg["faces"]["finder"] == "blazeface" else {}),
        "files": {name: file_digest(artifact.path(name)) for name in files},
        "provenance": {"config_hash": stable_hash(redacted(cfg)), "git_commit": git_commit(),
                       "data_fingerprint": fingerprint, "oof_macro_f1": report["ensemble"],
                       # a gate must say when its models never saw a real face (the page shows a banner)
                       "trained_on": TRAINED_ON_DEMO if (Path(cfg["data"]["root"]) / "synth.json").exists()
                       else "photos",
                       "selected_with": "oof_tta" if report["use_tta"] else "oof",
                       # the measured difference varies in the last bits with onnxruntime's threads: it is in
                       # done.json; the manifest holds the bound, so a second export writes the same bytes
                       "onnx_vs_torch_max_abs_below": 1e-4,
                       "config": redacted(cfg)},
    }

