"""The competition layout -> one table of image rows (labels fixed, every problem named).

    <root>/train/train.csv            id,gender,race,age,path
    <root>/train/images/<path>/       mask1..mask5, incorrect_mask, normal (.jpg/.jpeg/.png)
    <root>/eval/info.csv              ImageID,ans
    <root>/eval/images/<ImageID>
    <root>/eval_answers.csv           the demo's held-out answers (synth writes them; the competition has none)
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipeline import labels
from pipeline.errors import DataError
from pipeline.io import stable_hash

TRAIN_COLUMNS = ("id", "gender", "race", "age", "path")
EVAL_COLUMNS = ("ImageID", "ans")
FIX_COLUMNS = ("id", "field", "value")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MIN_AGE, MAX_AGE = 1, 120
HELDOUT_ANSWERS = "eval_answers.csv"  # beside eval/, never inside it: nothing that reads eval/ can see them


def train_csv(root) -> Path:
    return Path(root) / "train" / "train.csv"


def train_images(root) -> Path:
    return Path(root) / "train" / "images"


def eval_csv(root) -> Path:
    return Path(root) / "eval" / "info.csv"


def eval_images(root) -> Path:
    return Path(root) / "eval" / "images"


def heldout_answers(root) -> Path:
    return Path(root) / HELDOUT_ANSWERS


def quoted(value, limit: int = 40) -> str:
    """A short, escaped repr of text read from a file, for messages: a NUL-filled or one-line 300 KB file
    must not be echoed whole."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _short_values(error: Exception, value) -> str:
    """A message that quotes `value` (labels words it), with the value quoted short."""
    return str(error).replace(repr(value), quoted(value))


def read_csv(path, columns, what: str | None = None) -> pd.DataFrame:
    """All columns as strings (ids keep leading zeros); a missing, empty, binary or unparsable file, or
    missing columns, name the file and quote at most a few short, escaped pieces of it. With `what` (the
    rows it must hold), a file with a header and no rows is refused too."""
    path = Path(path)
    if not path.exists():
        raise DataError([f"{path}: file not found"])
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError as error:  # a folder, no permission, an I/O error
        raise DataError([f"{path}: cannot read ({error.strerror or error})"]) from error
    if not head:
        raise DataError([f"{path}: empty file (0 bytes); expected a CSV with columns {', '.join(columns)}"])
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError([f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"])
    if b"\0" in head:
        raise DataError([f"{path}: holds NUL bytes (a binary file, or one zero-filled by a crash), not a CSV; "
                         f"starts with {quoted(head[:16].decode('latin-1'))}"])
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        detail = str(error).strip()
        detail = detail if len(detail) <= 200 else f"{detail[:200]}..."
        raise DataError([f"{path}: not a readable CSV ({detail})"]) from error
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ", ".join(quoted(c) for c in frame.columns[:8]) + (
            f" and {len(frame.columns) - 8} more" if len(frame.columns) > 8 else "")
        raise DataError([f"{path}: missing column(s) {', '.join(missing)} (found: {found})"])
    if what and frame.empty:
        raise DataError([f"{path}: a header and no rows; expected {what}"])
    return frame


def _safe_relative(name: str) -> bool:
    """A name that stays inside its folder: no absolute paths, no '..'."""
    candidate = Path(name)
    return bool(name) and not candidate.is_absolute() and ".." not in candidate.parts and not name.startswith(("/", "\\"))


def read_people(root) -> tuple[pd.DataFrame, list[str], list[str]]:
    """train.csv -> one row per person; returns (people, problems, warnings).

    A person is a train.csv row and its image folder. The folder name is the person key
    (`person_id`): the real train.csv reuses id 003397 for two different people (different
    ages and folders), so ids alone cannot key people. A repeated folder is an error.
    """
    path = train_csv(root)
    frame = read_csv(path, TRAIN_COLUMNS, what="one row per person")
    problems, warnings, people = [], [], []
    folder_row: dict[str, int] = {}
    id_row: dict[str, int] = {}
    for index, row in enumerate(frame.itertuples(index=False), start=1):
        where = f"{path} row {index} (id {quoted(row.id)})"
        pid = str(row.id).strip()
        folder = str(row.path).strip()
        if not pid:
            problems.append(f"{where}: empty id")
            continue
        if folder in folder_row:
            problems.append(f"{where}: duplicate of row {folder_row[folder]} (same id and folder {quoted(folder)})"
                            if frame.iloc[folder_row[folder] - 1]["id"].strip() == pid else
                            f"{where}: folder {quoted(folder)} already belongs to row {folder_row[folder]}")
            continue
        if pid in id_row:
            warnings.append(f"{where}: id also used by row {id_row[pid]} for another folder; "
                            f"kept as a separate person keyed by folder {quoted(folder)}")
        folder_row[folder] = index
        id_row.setdefault(pid, index)
        if not _safe_relative(folder) or len(Path(folder).parts) != 1:
            problems.append(f"{where}: path {quoted(folder)} must be a folder name inside train/images")
            continue
        valid, gender, age = True, -1, -1
        try:
            gender = labels.gender_of(row.gender)
        except ValueError as error:
            problems.append(f"{where}: {_short_values(error, row.gender)}")
            valid = False
        try:
            age = int(str(row.age).strip())
        except ValueError:
            problems.append(f"{where}: age {quoted(row.age)} is not an integer")
            valid = False
        else:
            if not MIN_AGE <= age <= MAX_AGE:
                problems.append(f"{where}: age {age} is outside {MIN_AGE}..{MAX_AGE}")
                valid = False
        # people with bad labels stay (valid=False) so their images are still checked
        people.append({"person_id": folder, "id": pid, "gender": gender, "age": age, "race": row.race, "valid": valid})
    table = pd.DataFrame(people, columns=["person_id", "id", "gender", "age", "race", "valid"])
    return table, problems, warnings


def leaves_root(path: Path, root) -> str | None:
    """The problem line of a path that resolves outside data.root through a link (itself or a folder above
    it), else None. Such a file is never opened: a link may point at anything on the machine."""
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real.is_relative_to(real_root):
        return None
    return (f"{path}: a link to {real}, outside data.root ({real_root}); links that leave data.root are refused: "
            f"copy what it points to into data.root instead")


def person_images(folder: Path, root=None) -> tuple[dict[str, Path], list[str]]:
    """The 7 images of one person by stem; extensions matched case-insensitively; dotfiles ignored. With
    `root` (data.root), a folder or image that links outside it is a problem, never listed as an image."""
    outside = leaves_root(folder, root) if root is not None else None
    if outside:
        return {}, [outside]
    if not folder.is_dir():
        return {}, [f"{folder}: person folder missing"]
    found: dict[str, Path] = {}
    problems, refused = [], set()
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # e.g. macOS '._mask1.jpg' shadows in the real archive
        stem, ext = entry.stem, entry.suffix.lower()
        if ext not in IMAGE_EXTENSIONS or stem not in labels.MASK_BY_STEM:
            problems.append(f"{entry}: unexpected file (expected {', '.join(labels.IMAGE_STEMS)} "
                            f"with extension {'/'.join(IMAGE_EXTENSIONS)})")
            continue
        outside = leaves_root(entry, root) if root is not None and entry.is_symlink() else None
        if outside:
            problems.append(outside)
            refused.add(stem)
            continue
        if stem in found:
            problems.append(f"{entry}: second image for '{stem}' (also {found[stem].name})")
            continue
        found[stem] = entry
    missing = [s for s in labels.IMAGE_STEMS if s not in found and s not in refused]
    if missing:
        problems.append(f"{folder}: has {len(found)} of the 7 expected images; missing {', '.join(missing)}")
    return found, problems


def read_label_fixes(path) -> pd.DataFrame:
    fixes = read_csv(path, FIX_COLUMNS)
    problems = []
    for index, row in enumerate(fixes.itertuples(index=False), start=1):
        where = f"{path} row {index} (id {quoted(row.id)})"
        if row.field == "gender":
            try:
                labels.gender_of(row.value)
            except ValueError as error:
                problems.append(f"{where}: {_short_values(error, row.value)}")
        elif row.field == "age":
            if not str(row.value).isdigit():
                problems.append(f"{where}: age {quoted(row.value)} is not an integer")
            elif not MIN_AGE <= int(row.value) <= MAX_AGE:
                problems.append(f"{where}: age {row.value} is outside {MIN_AGE}..{MAX_AGE}")
        elif row.field == "swap_mask":
            pair = str(row.value).split(":")
            if len(pair) != 2 or any(p not in labels.MASK_BY_STEM for p in pair):
                problems.append(f"{where}: swap_mask value must be 'stemA:stemB', got {quoted(row.value)}")
        else:
            problems.append(f"{where}: unknown field {quoted(row.field)} (gender, age or swap_mask)")
    if problems:
        raise DataError(problems)
    return fixes


def apply_label_fixes(people: pd.DataFrame, fixes: pd.DataFrame,
                      source="label fixes") -> tuple[pd.DataFrame, dict, list[str], list[str]]:
    """Returns fixed people, {person_id: (stem_a, stem_b)} mask swaps, a log line per fix, and problems.

    A fix's `id` is a train.csv id or a person's folder name: the real data gives id 003397 to two
    people, so a fix by an id that several people share is refused, naming their folders, rather than
    applied to all of them. Two rows that fix one person's field to different values are refused, naming
    both; a row that repeats another's fix (the same value) is applied once and logged as a repeat."""
    people = people.copy()
    swaps, log, problems = {}, [], []
    first_fix: dict[tuple, tuple[int, object]] = {}  # (person, field) -> (row, value) of the first fix
    for index, row in enumerate(fixes.itertuples(index=False), start=1):
        matches = people.index[people["person_id"] == row.id]
        if len(matches) == 0:
            matches = people.index[people["id"] == row.id]
        if len(matches) > 1:
            folders = ", ".join(quoted(f) for f in people.loc[matches, "person_id"])
            problems.append(f"{source} row {index} (id {quoted(row.id)}): the id names {len(matches)} people "
                            f"({folders}); write the person's folder name in the id column to say which")
            continue
        if len(matches) == 0:
            log.append(f"{row.id}: {row.field} fix skipped (person not in this data)")
            continue
        i = matches[0]
        value = _fix_value(row)
        earlier = first_fix.setdefault((people.at[i, "person_id"], row.field), (index, value))
        if earlier[0] != index:
            if earlier[1] != value:
                problems.append(f"{source} rows {earlier[0]} and {index} (file lines {earlier[0] + 1} and "
                                f"{index + 1}): two {row.field} fixes for person {quoted(people.at[i, 'person_id'])} "
                                f"that disagree; keep one of them")
            else:
                log.append(f"{row.id}: {row.field} fix skipped (row {index} repeats row {earlier[0]})")
            continue
        _apply_fix(people, swaps, log, i, row)
    return people, swaps, log, problems


def _fix_value(row):
    """A fix's value as it is applied, so that 'Male' repeats 'male' and 'normal:mask1' 'mask1:normal'."""
    if row.field == "gender":
        return labels.gender_of(row.value)
    if row.field == "age":
        return int(row.value)
    return frozenset(str(row.value).split(":"))


def _apply_fix(people, swaps, log, i, row) -> None:
    if row.field == "gender":
        new = labels.gender_of(row.value)
        log.append(f"{row.id}: gender {labels.GENDER_NAMES[people.at[i, 'gender']]} -> {row.value}")
        people.at[i, "gender"] = new
    elif row.field == "age":
        log.append(f"{row.id}: age {people.at[i, 'age']} -> {row.value}")
        people.at[i, "age"] = int(row.value)
    elif row.field == "swap_mask":
        swaps[people.at[i, "person_id"]] = tuple(str(row.value).split(":"))
        log.append(f"{row.id}: labels of {row.value.replace(':', ' and ')} swapped")


def load_train(cfg: dict, strict: bool = True) -> tuple[pd.DataFrame, dict]:
    """One row per training image: person_id, image_id, file, mask, gender, age, age_band, label.

    Returns (table, info) where info holds 'problems', 'warnings', 'fixes' (log lines), 'people' and
    'image_files' (every image found, also of people whose labels are bad). With strict=True
    any problem raises DataError listing all of them.
    """
    root = cfg["data"]["root"]
    people, problems, warnings = read_people(root)
    fixes = None
    if cfg["data"]["label_fixes"]:
        try:
            fixes = read_label_fixes(cfg["data"]["label_fixes"])
        except DataError as error:  # listed with every other problem, not instead of them
            problems.extend(error.problems)
    swaps, fix_log = {}, []
    if fixes is not None:
        people, swaps, fix_log, fix_problems = apply_label_fixes(people, fixes, cfg["data"]["label_fixes"])
        problems.extend(fix_problems)
    rows, image_files = [], []
    image_root = train_images(root)
    for person in people.itertuples(index=False):
        found, person_problems = person_images(image_root / person.person_id, root)
        problems.extend(person_problems)
        image_files.extend(str(f) for f in found.values())
        swap = swaps.get(person.person_id)
        if not person.valid:
            continue
        for stem, file in found.items():
            label_stem = stem
            if swap and stem in swap:
                label_stem = swap[1] if stem == swap[0] else swap[0]
            rows.append({"person_id": person.person_id, "image_id": f"{person.person_id}/{stem}", "file": str(file),
                         "stem": stem, "mask": labels.mask_of(label_stem), "gender": person.gender,
                         "age": person.age})
    if strict and problems:
        raise DataError(problems)
    table = pd.DataFrame(rows, columns=["person_id", "image_id", "file", "stem", "mask", "gender", "age"])
    old = cfg["data"]["old_age"]
    table["age_band"] = labels.age_band(table["age"].to_numpy(), old) if len(table) else []
    table["label"] = labels.class_index(table["mask"].to_numpy(), table["gender"].to_numpy(),
                                        table["age_band"].to_numpy()) if len(table) else []
    table = table.sort_values("image_id", kind="stable").reset_index(drop=True)
    people = people[people["valid"]].drop(columns="valid").reset_index(drop=True)
    return table, {"problems": problems, "warnings": warnings, "fixes": fix_log, "people": people,
                   "image_files": image_files}


def load_eval(cfg: dict, strict: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """info.csv rows in their order, with the image file of each; problems name row and file."""
    root = cfg["data"]["root"]
    path = eval_csv(root)
    frame = read_csv(path, EVAL_COLUMNS, what="one row per eval image")
    folder = eval_images(root)
    problems, files = [], []
    seen: dict[str, int] = {}
    for index, image_id in enumerate(frame["ImageID"], start=1):
        where = f"{path} row {index}"
        if not _safe_relative(image_id) or len(Path(image_id).parts) != 1:
            problems.append(f"{where}: ImageID {quoted(image_id)} would leave {folder}")
            files.append("")
            continue
        if image_id in seen:
            problems.append(f"{where}: ImageID {quoted(image_id)} repeats row {seen[image_id]}")
        seen[image_id] = index
        file = folder / image_id
        outside = leaves_root(file, root)
        if outside:
            problems.append(f"{where}: {outside}")
            files.append("")
            continue
        if not file.is_file():
            problems.append(f"{where}: image {file} is missing")
        files.append(str(file))
    if strict and problems:
        raise DataError(problems)
    frame = frame.assign(file=files, image_id=frame["ImageID"])
    return frame, problems


def counts(table: pd.DataFrame, people: pd.DataFrame, cfg: dict) -> dict:
    """People and images by gender, age band (official and training cut), mask and class."""
    train_bands = labels.age_band(people["age"].to_numpy(), cfg["data"]["train_old_age"])
    official_bands = labels.age_band(people["age"].to_numpy(), cfg["data"]["old_age"])
    return {
        "people": int(len(people)),
        "images": int(len(table)),
        "people_by_gender": {labels.GENDER_NAMES[g]: int((people["gender"] == g).sum()) for g in (0, 1)},
        "people_by_age_band": {labels.AGE_NAMES[b]: int((official_bands == b).sum()) for b in range(3)},
        "people_by_train_age_band": {labels.AGE_NAMES[b]: int((train_bands == b).sum()) for b in range(3)},
        "images_by_mask": {labels.MASK_NAMES[m]: int((table["mask"] == m).sum()) for m in range(3)},
        "images_by_class": {int(c): int((table["label"] == c).sum()) for c in range(labels.NUM_CLASSES)},
        "age_range": [int(people["age"].min()), int(people["age"].max())] if len(people) else None,
    }


def data_fingerprint(table: pd.DataFrame) -> str:
    """Identity of the labelled data: which images, of whom, with which labels."""
    return stable_hash(table[["image_id", "person_id", "label", "age"]].to_numpy().tolist(), length=16)
