"""What the competition's notebooks plot first, from the check stage's tables: PNGs and one self-contained page.

    class_counts.png   images per class (18) and per head (mask, gender, age band)
    age_gender.png     people by age band and gender, grouped and stacked
    age_histogram.png  people by age, with the band cuts (30, data.old_age, and data.train_old_age if it differs)
    files.png          images per person, per extension and per size (with the files at hand)
    samples.png        a few images of each class (with the files at hand)
    report.html        all of them in one page (the images inside it), with the counts

`people` (one row per person: age, gender) is enough for the first three: the real competition's train.csv, with
no images, gives them (every person has 5 worn, 1 incorrect and 1 unworn photo).
"""
from __future__ import annotations

import base64
import html
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.io import atomic_write_bytes, atomic_write_text

PER_PERSON = {0: 5, 1: 1, 2: 1}  # the competition's photos of one person, by mask class


def images_of_people(people: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    """The image rows the competition's layout implies for `people` (age, gender): 7 each, by mask class."""
    bands = labels.age_band(people["age"].to_numpy(), cfg["data"]["old_age"])
    rows = [(m, g, b) for g, b in zip(people["gender"].to_numpy(), bands) for m, n in PER_PERSON.items()
            for _ in range(n)]
    frame = pd.DataFrame(rows, columns=["mask", "gender", "age_band"])
    frame["label"] = frame["mask"] * 6 + frame["gender"] * 3 + frame["age_band"]
    return frame


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width, height), dpi=100), plt


def _png(figure, plt) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def class_counts(table: pd.DataFrame) -> bytes:
    figure, plt = _figure(13, 7)
    grid = figure.add_gridspec(2, 3)
    axis = figure.add_subplot(grid[0, :])
    counts = np.bincount(table["label"], minlength=labels.NUM_CLASSES)
    colours = ["#1fa64a"] * 6 + ["#f0a000"] * 6 + ["#e0282e"] * 6
    bars = axis.bar(range(labels.NUM_CLASSES), counts, color=colours)
    axis.bar_label(bars, fontsize=8)
    axis.set_xticks(range(labels.NUM_CLASSES))
    axis.set_xticklabels([f"{c}\n{labels.GENDER_NAMES[g][0]} {labels.AGE_NAMES[a]}" for c, (m, g, a) in
                          enumerate(labels.decompose(c) for c in range(labels.NUM_CLASSES))], fontsize=8)
    axis.set_title("images per class (green: mask worn, amber: incorrect, red: not worn)")
    for column, (head, names) in enumerate((("mask", labels.MASK_NAMES), ("gender", labels.GENDER_NAMES),
                                            ("age_band", labels.AGE_NAMES))):
        axis = figure.add_subplot(grid[1, column])
        values = np.bincount(table[head], minlength=len(names))
        bars = axis.bar([str(names[i]) for i in range(len(names))], values, color="#4a78c2")
        axis.bar_label(bars, fontsize=8)
        axis.set_title(f"images per {head.replace('_', ' ')}")
    return _png(figure, plt)


def age_gender(people: pd.DataFrame, cfg: dict) -> bytes:
    figure, plt = _figure(12, 4.5)
    bands = labels.age_band(people["age"].to_numpy(), cfg["data"]["old_age"])
    counts = np.array([[int(((bands == b) & (people["gender"].to_numpy() == g)).sum()) for g in (0, 1)]
                       for b in range(3)])
    names = [str(labels.AGE_NAMES[b]) for b in range(3)]
    grouped, stacked = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for g, colour in ((0, "#4a78c2"), (1, "#d0587e")):
        bars = grouped.bar(np.arange(3) + (g - 0.5) * 0.4, counts[:, g], width=0.4, color=colour,
                           label=labels.GENDER_NAMES[g])
        grouped.bar_label(bars, fontsize=8)
        stacked.bar(names, counts[:, g], bottom=counts[:, 0] if g else None, color=colour, label=labels.GENDER_NAMES[g])
    grouped.set_xticks(range(3))
    grouped.set_xticklabels(names)
    grouped.set_title("people by age band and gender (grouped)")
    stacked.set_title("people by age band and gender (stacked)")
    grouped.legend()
    stacked.legend()
    return _png(figure, plt)


def age_histogram(people: pd.DataFrame, cfg: dict) -> bytes:
    figure, plt = _figure(10, 4)
    axis = figure.add_subplot(1, 1, 1)
    ages = people["age"].to_numpy()
    axis.hist(ages, bins=np.arange(ages.min(), ages.max() + 2) - 0.5, color="#4a78c2")
    cuts = {30: "30", cfg["data"]["old_age"]: f"data.old_age {cfg['data']['old_age']}"}
    if cfg["data"]["train_old_age"] != cfg["data"]["old_age"]:
        cuts[cfg["data"]["train_old_age"]] = f"data.train_old_age {cfg['data']['train_old_age']}"
    for age, name in cuts.items():
        axis.axvline(age - 0.5, color="#e0282e", linestyle="--")
        axis.text(age - 0.4, axis.get_ylim()[1] * 0.92, name, color="#e0282e", fontsize=9)
    axis.set_xlabel("age")
    axis.set_ylabel("people")
    axis.set_title(f"people by age ({len(ages)}, ages {ages.min()}-{ages.max()}): the band cuts")
    return _png(figure, plt)


def files_plot(table: pd.DataFrame, sizes: list[tuple[int, int]]) -> bytes:
    figure, plt = _figure(13, 4)
    per_person = Counter(table.groupby("person_id").size().tolist())
    extensions = Counter(Path(f).suffix.lower() or "(none)" for f in table["file"])
    by_size = Counter(f"{w}x{h}" for w, h in sizes)
    for column, (title, counter) in enumerate((("images per person", per_person), ("images per extension", extensions),
                                               ("images per size (w x h)", by_size))):
        axis = figure.add_subplot(1, 3, column + 1)
        keys = sorted(counter, key=str)[:20]
        bars = axis.bar([str(k) for k in keys], [counter[k] for k in keys], color="#4a78c2")
        axis.bar_label(bars, fontsize=8)
        axis.set_title(title)
        axis.tick_params(axis="x", labelrotation=30)
    return _png(figure, plt)


def samples(table: pd.DataFrame, cfg: dict, per_class: int = 4, seed: int = 0) -> bytes:
    from pipeline.data.images import decode_file

    figure, plt = _figure(per_class * 1.6, labels.NUM_CLASSES * 1.9)
    rng = np.random.default_rng(seed)
    for c in range(labels.NUM_CLASSES):
        rows = table.index[table["label"] == c].to_numpy()
        chosen = rng.choice(rows, size=min(per_class, len(rows)), replace=False) if len(rows) else []
        for i in range(per_class):
            axis = figure.add_subplot(labels.NUM_CLASSES, per_class, c * per_class + i + 1)
            axis.axis("off")
            if i < len(chosen):
                image = decode_file(table.at[chosen[i], "file"], cfg["data"]["max_image_pixels"])[0]
                axis.imshow(image[::4, ::4])
            if i == 0:
                m, g, a = labels.decompose(c)
                axis.set_title(f"{c}: {labels.MASK_NAMES[m]} {labels.GENDER_NAMES[g]} {labels.AGE_NAMES[a]}",
                               fontsize=7, loc="left")
    return _png(figure, plt)


def write_report(folder: Path, people: pd.DataFrame, table: pd.DataFrame | None, cfg: dict, report: dict,
                 sizes: list[tuple[int, int]] | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """The PNGs and report.html under `folder`; `table` None: the people-level plots only (metadata, no images)."""
    images = table if table is not None else images_of_people(people, cfg)
    plots = {"class_counts.png": class_counts(images), "age_gender.png": age_gender(people, cfg),
             "age_histogram.png": age_histogram(people, cfg)}
    if table is not None:
        plots["files.png"] = files_plot(table, sizes or [])
        plots["samples.png"] = samples(table, cfg)
    plots.update(extra or {})
    for name, png in plots.items():
        atomic_write_bytes(folder / name, png)
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in report.items()
                   if not isinstance(v, (list, dict)) or k.startswith(("people_by", "images_by")))
    figures = "".join(f'<h2>{html.escape(name.removesuffix(".png").replace("_", " "))}</h2>'
                      f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                      for name, png in plots.items())
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>maskfold check: "
            f"{html.escape(str(report.get('data_root', '')))}</title><style>body{{font:15px system-ui;margin:2rem;"
            f"max-width:1400px}} img{{max-width:100%;border:1px solid #ddd}} th{{text-align:left;padding-right:1rem}}"
            f"</style></head><body><h1>maskfold: the data at a glance</h1>"
            f"{'<p><b>Metadata only:</b> class counts assume the competition layout (5 worn, 1 incorrect, 1 unworn photo per person).</p>' if table is None else ''}"
            f"<table>{rows}</table>{figures}</body></html>")
    return atomic_write_text(folder / "report.html", page)


def add_section(folder: Path, name: str, png: bytes, title: str) -> tuple[Path, Path]:
    """Write `name` under `folder` and put it in report.html as its own section, replacing an earlier one of the
    same name (a page check has not written yet is started here)."""
    atomic_write_bytes(folder / name, png)
    page_path = folder / "report.html"
    page = page_path.read_text() if page_path.exists() else (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>maskfold</title></head><body></body></html>")
    start, end = f"<!--section {name}-->", f"<!--/section {name}-->"
    if start in page and end in page:
        page = page[:page.index(start)] + page[page.index(end) + len(end):]
    section = (f'{start}<h2>{html.escape(title)}</h2><img alt="{html.escape(name)}" '
               f'src="data:image/png;base64,{base64.b64encode(png).decode()}">{end}')
    page = page.replace("</body>", section + "</body>")
    return folder / name, atomic_write_text(page_path, page)
