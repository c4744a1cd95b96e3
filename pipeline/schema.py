"""What each config value may be: one strict pydantic model per section of configs/base.yaml.

The loader (pipeline/config.py) merges base.yaml, a config file and overrides into a plain dict and
hands it to `config_problems`, which returns one line per bad key, `<dotted.key> = <value!r>: <what
is allowed>`, so a run is refused at load instead of failing mid-training. The models only check;
the config stays the merged dict. Every field carries its "allowed" text as its description: that
text is what a user reads, whichever constraint failed. Rules spanning keys raise `_refuse(...)`,
which names the key itself. No torch/timm/albumentations here: stages that only read configs start
in about a second.
"""
from __future__ import annotations

import copy
import difflib
import reprlib
from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

# the modules that implement these own their lists; they import no torch
from pipeline.data.crop import FINDERS, MODES as CROP_MODES, PERSON_BOX  # noqa: E402
from pipeline.labels import HEAD_KINDS, HEADS  # noqa: E402
from pipeline.train import engines, precision, views  # noqa: E402
from pipeline.train.losses import LOSSES  # noqa: E402

HeadName = Literal[tuple(HEADS)]

SPACE_TYPES = ("float", "int", "categorical")
STORAGE_URL = r"^(sqlite:///.+|journal:.+|(postgresql|mysql)(\+\w+)?://.+|env:[A-Za-z_][A-Za-z0-9_]*)$"
RAY_ADDRESS = r"^(auto|[^\s/:]+:\d+)$"


# ---- building blocks: a type plus the sentence that says what it allows ----

def _int(ge: int, le: int | None = None):
    allowed = f"an integer >= {ge}" if le is None else f"an integer in {ge}..{le}"
    return Annotated[int, Field(ge=ge, le=le, description=allowed)]


def _interval(low: float | None, high: float | None, closed_low: bool, closed_high: bool) -> str:
    if low is None:
        return "a number"
    if high is None:
        return f"a number {'>=' if closed_low else '>'} {low:g}"
    return f"a number in {'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"


def _float(ge=None, gt=None, le=None, lt=None):
    low, high = (ge if gt is None else gt), (le if lt is None else lt)
    allowed = _interval(low, high, gt is None, lt is None)
    return Annotated[float, Field(ge=ge, gt=gt, le=le, lt=lt, allow_inf_nan=False, description=allowed)]


def _one_of(*values: str):
    return Annotated[Literal[values], Field(description=f"one of {', '.join(values)}")]


def _described(kind, allowed: str):
    return Annotated[kind, Field(description=allowed)]


def _refuse(allowed: str, key: str | None = None) -> PydanticCustomError:
    """An error for a rule pydantic cannot state; `key` names the config key when the rule spans several."""
    return PydanticCustomError("config_rule", "{allowed}", {"allowed": allowed, **({"key": key} if key else {})})


def _distinct(values: list) -> list:
    if len(set(map(repr, values))) != len(values):
        raise ValueError("repeated items")
    return values


def _tta_view(view: str) -> str:
    views.parse(view)  # ValueError naming the view
    return view


def _box_not_inverted(box: list[float]) -> list[float]:
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        raise ValueError("inverted box")
    return box


def _divides_one(step: float) -> float:
    # the weight grid has round(1/step) ticks: a step like 0.3 would silently become 1/3
    if abs(1 / step - round(1 / step)) > 1e-6:
        raise ValueError("1/step is not whole")
    return step


def _names_a_transform(step: dict) -> dict:
    if not isinstance(step.get("name"), str) or not step["name"]:
        raise ValueError("no name")
    return step


Count = _int(ge=1)
CountOrZero = _int(ge=0)
Seed = _described(_int(ge=0), "an integer seed >= 0")
Age = _int(ge=31, le=120)
Positive = _float(gt=0)
NonNegative = _float(ge=0)
Bool = _described(bool, "true or false")
Text = Annotated[str, Field(min_length=1)]
PathText = _described(Text, "a non-empty path (may use {config} and {data.root})")
Folds = Annotated[list[CountOrZero], Field(min_length=1), AfterValidator(_distinct)]
FOLDS_ALLOWED = "a non-empty list of distinct fold numbers in 0..folds.k-1"


def _size(minimum: int):
    return Annotated[list[_int(ge=minimum)], Field(
        min_length=2, max_length=2, description=f"2 integers [w, h], each >= {minimum}")]


def _three(item, allowed: str):
    return Annotated[list[item], Field(min_length=3, max_length=3, description=allowed)]


# ---- sections ----

class _Section(BaseModel):
    # strict: 2.5 or "zero" is not an int, null is not a number; floats still take ints
    model_config = ConfigDict(extra="forbid", strict=True)


class CropSection(_Section):
    mode: _one_of(*CROP_MODES)
    box: Annotated[list[_float(ge=0, le=1)], Field(
        min_length=4, max_length=4,
        description="4 numbers [x0, y0, x1, y1] in [0, 1] with x0 < x1 and y0 < y1"), AfterValidator(_box_not_inverted)]
    margin: _described(Annotated[list[_float(ge=0, le=2)], Field(min_length=4, max_length=4)],
                       "4 numbers [left, top, right, bottom] in [0, 2]: shares of the face box's width and height")


class DataSection(_Section):
    root: PathText
    label_fixes: _described(str | None, "a path to a label-fixes CSV (may use {data.root}), or null")
    old_age: Age
    train_old_age: Age
    crop: _described(CropSection, "a mapping {mode: box|detect, box: [x0, y0, x1, y1], margin: [left, top, right, "
                                  "bottom]} (the fixed box is data.crop.box)")
    image_size: _size(16)
    cache_dir: PathText
    num_workers: CountOrZero
    max_image_pixels: _int(1024)

    @model_validator(mode="after")
    def _training_cut_not_above_official(self):
        if self.train_old_age > self.old_age:
            raise _refuse(f"must be <= data.old_age ({self.old_age}): the training age cut may move down, never up",
                          "data.train_old_age")
        return self


class FacesSection(_Section):
    dir: PathText
    finder: _one_of(*FINDERS)
    blazeface_min_score: _float(gt=0, le=1)
    min_score: _float(ge=0, le=1)
    detect_scale: _float(gt=0, le=1)
    min_face: _described(_int(ge=12), "an integer >= 12 (pixels of the source image)")
    person_box: _one_of(*PERSON_BOX)
    sheet_people: CountOrZero


class OutputSection(_Section):
    dir: PathText


class FoldsSection(_Section):
    dir: PathText
    k: _int(ge=2)
    seed: Seed


class SynthSection(_Section):
    out: PathText
    people: Count
    eval_people: Count
    seed: Seed
    image_size: _size(32)
    label_noise: _float(ge=0, le=0.5)
    mask_swaps: _float(ge=0, le=0.5)
    workers: Count


class ModelSection(_Section):
    backbones: Annotated[list[Text], Field(
        min_length=1, description="a non-empty list of distinct timm model names"), AfterValidator(_distinct)]
    head: _one_of(*HEAD_KINDS)
    pretrained: Bool
    pretrained_files: _described(dict[Text, Text], "a mapping of backbone name to weights file path")
    drop_rate: _float(ge=0, lt=1)
    head_weights: _described(dict[HeadName, Positive], "a mapping of mask, gender and/or age to a number > 0")
    tasks: _described(dict[Text, Annotated[list[HeadName], Field(min_length=1), AfterValidator(_distinct)]],
                      "a mapping of backbone name to the heads it alone trains, e.g. {efficientnet_b4: [age]}")

    @model_validator(mode="after")
    def _tasks_name_backbones_and_cover_every_head(self):
        if not self.tasks:
            return self
        unknown = [b for b in self.tasks if b not in self.backbones]
        if unknown:
            raise _refuse(f"names {unknown[0]!r}, which is not in model.backbones", "model.tasks")
        if self.head != "multihead":
            raise _refuse("per-task backbones need model.head: multihead (a single 18-way head has no heads to "
                          "choose)", "model.tasks")
        covered = {h for b in self.backbones for h in self.tasks.get(b, HEADS)}
        missing = [h for h in HEADS if h not in covered]
        if missing:
            raise _refuse(f"no backbone predicts the {missing[0]} head: list it for one of them, or leave one "
                          f"backbone out of model.tasks (it then trains every head)", "model.tasks")
        return self


class TrainSection(_Section):
    folds: _described(Folds | None, f"null (all folds) or {FOLDS_ALLOWED}")
    epochs: Count
    batch_size: Count
    accumulate: Count
    optimizer: _one_of("adamw", "sgd")
    lr: Positive
    weight_decay: NonNegative
    momentum: _float(ge=0, lt=1)
    schedule: _one_of("cosine", "step", "plateau", "none")
    min_lr: NonNegative
    step_size: Count
    gamma: _float(gt=0, le=1)
    plateau_patience: CountOrZero
    warmup_epochs: NonNegative
    freeze_epochs: CountOrZero
    backbone_lr_mult: _float(gt=0, le=10)
    layer_decay: _described(_float(ge=0, le=1), "0 (off) or a number in (0, 1]")
    ema_decay: _described(_float(ge=0, lt=1), "0 (off) or a number in (0, 1), e.g. 0.999")
    patience: Count
    checkpoint_every: Count
    loss: _one_of(*LOSSES)
    label_smoothing: _float(ge=0, lt=1)
    focal_gamma: NonNegative
    class_weights: Bool
    weighted_sampler: Bool
    cutmix_p: _float(ge=0, le=1)
    seed: Seed
    device: _one_of("auto", "cpu", "cuda")
    precision: _one_of(*precision.PRECISIONS)
    clip_grad: _described(_float(ge=0), "0 (off) or the largest gradient norm, a number > 0 (e.g. 1.0)")
    channels_last: Bool
    cudnn_benchmark: Bool
    tf32: Bool
    threads: CountOrZero
    max_batches: CountOrZero


class LogSection(_Section):
    # YAML reads a bare `off` as false: take it as "off" rather than refuse what the user wrote
    wandb: _described(Literal["off", "offline", "online", False], "one of off, offline, online")
    project: _described(Text, "a non-empty W&B project name")
    entity: _described(Text | None, "null (your default W&B entity) or a team/user name")
    group: _described(Text | None, "null (the config's name) or a W&B group name")


class AugmentSection(_Section):
    mean: _three(_float(), "3 numbers (one per RGB channel)")
    std: _three(_float(gt=0), "3 numbers > 0 (one per RGB channel)")
    engine: _one_of(engines.AUTO, *engines.ENGINES)
    train: _described(list[Annotated[dict[str, Any], AfterValidator(_names_a_transform)]] | None,
                      "null or a list of albumentations transforms, each a mapping with a string 'name' "
                      "(e.g. {name: HorizontalFlip, p: 0.5})")
    gpu: _described(list[Annotated[dict[str, Any], AfterValidator(_names_a_transform)]] | None,
                    "null or a list of kornia.augmentation transforms, each a mapping with a string 'name' "
                    "(e.g. {name: RandomHorizontalFlip, p: 0.5})")


class InferSection(_Section):
    tta: Annotated[list[Annotated[str, AfterValidator(_tta_view)]], Field(
        min_length=1, description=f"a non-empty list of distinct views, each {views.ALLOWED}"), AfterValidator(_distinct)]
    batch_size: Count


class EnsembleSection(_Section):
    weights: _one_of("equal", "fit")
    weight_step: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False,
                                        description="a number in (0, 1] whose inverse is whole (0.05, 0.1, 0.25, ...)"),
                           AfterValidator(_divides_one)]
    combine: _one_of("joint", "heads")
    use_tta: Bool
    decision: _one_of("argmax", "offsets")


class ThresholdsSection(_Section):
    mask: _float(gt=0, le=1)
    gender: _float(gt=0, le=1)
    age: _float(gt=0, le=1)


class PseudoSection(_Section):
    labels: _described(Text | None, "null, or the path of a pseudo.csv the pseudo stage wrote (in a teacher run's "
                                    "output.dir; may use {config} and {data.root})")
    thresholds: _described(ThresholdsSection, "a mapping {mask, gender, age} of probabilities in (0, 1]")


class DistillSection(_Section):
    teacher: _described(Text | None, "null, or the path of an ensemble_probs.npz the ensemble stage wrote (in a "
                                     "teacher run's output.dir; may use {config} and {data.root})")


class TuneSection(_Section):
    trials: Count
    storage: Annotated[str, Field(pattern=STORAGE_URL,
                                  description="a storage URL: sqlite:///FILE, journal:FILE, postgresql://... or env:VARIABLE "
                                              "(or mysql://...)")]
    study: _described(Text, "a non-empty study name")
    folds: _described(Folds, FOLDS_ALLOWED)
    epochs: Count
    backbone: _described(Text | None, "null (the first of model.backbones) or a backbone name")
    seed: Seed
    pruner: _one_of("median", "none")
    heartbeat_s: Positive
    grace_s: Positive
    max_retry: CountOrZero
    space: _described(list[dict[str, Any]],
                      "a list of {param: <config key>, type: float|int|categorical, low, high[, log] | choices}")

    @field_validator("space")
    @classmethod
    def _space_entries_are_usable(cls, space: list[dict], info: ValidationInfo) -> list[dict]:
        known_keys = (info.context or {}).get("known_keys")
        for index, entry in enumerate(space):
            problem = _space_entry_problem(entry, known_keys)
            if problem:
                raise _refuse(problem, f"tune.space[{index}]")
        params = [entry["param"] for entry in space]
        repeated = sorted({param for param in params if params.count(param) > 1})
        if repeated:
            raise _refuse(f"each param may appear once; repeated: {', '.join(repeated)}", "tune.space")
        return space

    @model_validator(mode="after")
    def _grace_outlasts_heartbeat(self):
        if self.grace_s <= self.heartbeat_s:
            raise _refuse(f"must be greater than tune.heartbeat_s ({self.heartbeat_s:g}): a live worker would be "
                          "declared dead between two heartbeats", "tune.grace_s")
        return self


class GateSection(_Section):
    host: _described(Text, "an address to listen on, e.g. 127.0.0.1")
    port: _int(ge=1, le=65535)
    max_upload_mb: Positive
    webhook: _described(Annotated[str, Field(pattern=r"^https?://\S+$")] | None, "null or an http(s):// URL")
    webhook_timeout_s: Positive
    track_seconds: Positive
    track_iou: _float(gt=0, le=1)
    events_kept: Count
    min_face: _described(_int(ge=12) | None, "null (the bundle's faces.min_face) or an integer >= 12")
    folds: _described(Folds | None, f"null (every fold model) or {FOLDS_ALLOWED}")
    token: _described(Annotated[str, Field(pattern=r"^env:[A-Za-z_][A-Za-z0-9_]*$")] | None,
                      "null, or env:NAME: the environment variable that holds the token (never the token itself, "
                      "which would reach every artifact's config)")
    thumbnails: Bool
    events_keep_days: Positive
    events_log_mb: Positive
    workers: CountOrZero
    max_in_flight: CountOrZero
    read_timeout_s: Positive


class RunnerSection(_Section):
    mode: _one_of("local", "ray")
    address: _described(Annotated[str, Field(pattern=RAY_ADDRESS)] | None,
                         "null (start Ray on this machine), or auto or HEAD_HOST:PORT: the cluster this machine "
                         "is a node of (not ray://: Ray Client cannot stream the jobs' progress)")
    cpus_per_job: _described(Count | None, "null (train.threads, or 1 when that is 0) or an integer >= 1")
    gpus_per_job: _float(gt=0, le=1)
    max_retries: CountOrZero


def _space_entry_problem(entry: dict, known_keys: Collection[str] | None) -> str | None:
    """What is wrong with one tune.space entry (structure only; values are tried in `_space_value_problems`)."""
    param, kind = entry.get("param"), entry.get("type")
    if not isinstance(param, str) or kind not in SPACE_TYPES:
        return f"needs param (a config key) and type ({', '.join(SPACE_TYPES)})"
    if known_keys is not None and param not in known_keys:
        close = difflib.get_close_matches(param, sorted(known_keys), n=1)
        return f"param {param!r} is not a config key" + (f"; did you mean {close[0]!r}?" if close else "")
    if kind == "categorical":
        extra = set(entry) - {"param", "type", "choices"}
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            return "a categorical param needs a non-empty choices list"
        return f"a categorical param takes only param, type, choices; not {', '.join(sorted(extra))}" if extra else None
    return _range_problem(entry, kind)


def _range_problem(entry: dict, kind: str) -> str | None:
    extra = set(entry) - {"param", "type", "low", "high", "log"}
    if extra:
        return f"a {kind} param takes only param, type, low, high, log; not {', '.join(sorted(extra))}"
    number = int if kind == "int" else (int, float)
    low, high, log = entry.get("low"), entry.get("high"), entry.get("log", False)
    if not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)):
        return f"a {kind} param needs low and high, both {'integers' if kind == 'int' else 'numbers'}"
    if not low < high:
        return f"needs low < high, got low {low} and high {high}"
    if not isinstance(log, bool):
        return "log must be true or false"
    if log and low <= 0:
        return f"log: true needs low > 0, got {low}"
    return None


class Config(BaseModel):
    """The whole config; the section order matters: a cross-section check sees only the sections before it."""
    model_config = ConfigDict(extra="forbid", strict=True)

    data: DataSection
    faces: FacesSection
    output: OutputSection
    folds: FoldsSection
    synth: SynthSection
    model: ModelSection
    train: TrainSection
    log: LogSection
    augment: AugmentSection
    infer: InferSection
    ensemble: EnsembleSection
    pseudo: PseudoSection
    distill: DistillSection
    tune: TuneSection
    gate: GateSection
    runner: RunnerSection

    @field_validator("train")
    @classmethod
    def _train_folds_exist(cls, train: TrainSection, info: ValidationInfo) -> TrainSection:
        _check_folds_exist("train.folds", train.folds, info.data.get("folds"))
        return train

    @field_validator("ensemble")
    @classmethod
    def _per_task_models_vote_per_head(cls, ensemble: EnsembleSection, info: ValidationInfo) -> EnsembleSection:
        model = info.data.get("model")
        partial = model is not None and any(set(h) != set(HEADS) for h in model.tasks.values())
        if partial and ensemble.combine != "heads":
            raise _refuse("must be heads when model.tasks gives a backbone only some heads: its vote counts "
                          "per head (an 18-class joint needs every head)", "ensemble.combine")
        return ensemble

    @field_validator("gate")
    @classmethod
    def _gate_folds_exist(cls, gate: GateSection, info: ValidationInfo) -> GateSection:
        _check_folds_exist("gate.folds", gate.folds, info.data.get("folds"))
        return gate

    @field_validator("tune")
    @classmethod
    def _tune_folds_exist(cls, tune: TuneSection, info: ValidationInfo) -> TuneSection:
        _check_folds_exist("tune.folds", tune.folds, info.data.get("folds"))
        return tune


def _check_folds_exist(key: str, chosen: list[int] | None, folds: FoldsSection | None) -> None:
    if folds is None or not chosen:  # folds section itself invalid (reported there), or "all folds"
        return
    missing = [fold for fold in chosen if fold >= folds.k]
    if missing:
        raise _refuse(f"must list folds in 0..{folds.k - 1} (folds.k = {folds.k}); no fold {missing}", key)


# ---- from pydantic errors to one line per key ----

def _short(value, limit: int = 120) -> str:
    """A value's repr, cut: a YAML alias bomb expands to gigabytes, and its error must not quote them."""
    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlist, short.maxdict, short.maxlevel = limit, limit, 8, 8, 3
    if isinstance(value, dict) and len(value) <= short.maxdict:  # reprlib would sort the keys
        text = "{" + ", ".join(f"{short.repr(k)}: {short.repr(v)}" for k, v in value.items()) + "}"
    else:
        text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def config_problems(cfg: dict, known_keys: Collection[str]) -> list[str]:
    """Every problem of a merged config, one `<key> = <value!r>: <allowed>` line per bad key; [] when valid.

    `known_keys`: the dotted keys base.yaml declares (what a tune.space param may name). The loader's
    `name` entry is not a config key and is ignored."""
    sections = {key: value for key, value in cfg.items() if key != "name"}
    problems = _validation_problems(sections, known_keys)
    return problems or _space_value_problems(sections, known_keys)


def _validation_problems(sections: dict, known_keys: Collection[str]) -> list[str]:
    try:
        Config.model_validate(sections, context={"known_keys": frozenset(known_keys)})
    except ValidationError as error:
        lines = {}
        for item in error.errors():
            key, value, allowed = _describe(item, sections)
            lines.setdefault(key, f"{key} = {_short(value)}: {allowed}")
        return list(lines.values())
    return []


def _describe(item: dict, sections: dict) -> tuple[str, Any, str]:
    """(key, bad value, what is allowed) for one pydantic error."""
    ctx = item.get("ctx") or {}
    if item["type"] == "config_rule" and "key" in ctx:
        return ctx["key"], _value_at(sections, ctx["key"]), ctx["allowed"]
    key, value = _locate(item["loc"], sections)
    if item["type"] == "config_rule":
        return key, value, ctx["allowed"]
    return key, value, _allowed(item)


def _locate(loc: tuple, sections: dict) -> tuple[str, Any]:
    """The dotted key and value an error is about: the whole value of a key (data.crop.mode inside a
    nested section), or one mapping of a list of mappings (tune.space[2]), which is shorter to read than
    the whole list."""
    if not loc:
        return "config", sections
    key, value = str(loc[0]), sections.get(loc[0])
    depth, model = 1, _section_model(loc[0])
    while depth < len(loc) and isinstance(value, dict) and model is not None:
        key, value = f"{key}.{loc[depth]}", value.get(loc[depth])
        model = _nested_model(model, loc[depth])
        depth += 1
    if depth < len(loc) and isinstance(loc[depth], int) and isinstance(value, list) and depth < 3 \
            and loc[depth] < len(value) and isinstance(value[loc[depth]], dict):
        key, value = f"{key}[{loc[depth]}]", value[loc[depth]]
    return key, value


def _section_model(name):
    field = Config.model_fields.get(name)
    return field.annotation if field is not None else None


def _nested_model(model, name):
    """The section model a field holds (data.crop -> CropSection), or None for a plain value."""
    field = model.model_fields.get(name) if isinstance(model, type) and issubclass(model, BaseModel) else None
    if field is None:
        return None
    kind = field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _allowed(item: dict) -> str:
    loc = item["loc"]
    model = _section_model(loc[0]) if loc else None
    if model is None:
        return "is not a config section"
    if len(loc) == 1:
        return "must be a mapping of keys (a config section)"
    field = None
    for depth, part in enumerate(loc[1:], start=1):
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return "is not a config key" if depth == len(loc) - 1 or isinstance(part, str) else item["msg"]
        inner = _nested_model(model, part)
        if inner is None or depth == len(loc) - 1:
            break
        model = inner
    return f"must be {field.description}" if field.description else item["msg"]


def _value_at(sections: dict, dotted: str):
    node = sections
    for part in dotted.replace("[", ".").replace("]", "").split("."):
        node = node[int(part)] if isinstance(node, list) else node.get(part)
    return node


# ---- tune.space: would each value a trial can draw pass? ----

def _space_value_problems(sections: dict, known_keys: Collection[str]) -> list[str]:
    """Try the ends of each range and every choice, so a bad space fails at load, not at trial 17."""
    problems = []
    for index, entry in enumerate(sections["tune"]["space"]):
        for value in _candidate_values(entry):
            trial = _with_value(sections, entry["param"], value)
            refused = _validation_problems(trial, known_keys)
            if refused:
                problems.append(f"tune.space[{index}] = {entry!r}: a trial could set {refused[0]}")
                break
    return problems


def _candidate_values(entry: dict) -> list:
    if entry["type"] == "categorical":
        return list(entry["choices"])
    cast = float if entry["type"] == "float" else int
    return [cast(entry["low"]), cast(entry["high"])]


def _with_value(sections: dict, dotted: str, value) -> dict:
    changed = copy.deepcopy(sections)
    *parents, last = dotted.split(".")
    node = changed
    for part in parents:
        node = node[part]
    node[last] = value
    return changed
