"""The check stage's plots and page (pipeline/data/eda.py), on the demo's data and on the real competition's
metadata (../shared/data/real_meta/, read in place, never copied)."""
import re

import numpy as np
import pandas as pd
import pytest

from pipeline.data.eda import images_of_people, write_report
from pipeline.io import PROJECT_ROOT
from pipeline.stages import check
from tests.conftest import make_config

REAL_META = PROJECT_ROOT.parent / "shared" / "data" / "real_meta" / "train.csv"
PNG = b"\x89PNG\r\n\x1a\n"


def test_check_draws_the_notebooks_plots_into_one_self_contained_page(tiny_data, tmp_path, capsys):
    cfg = make_config(tmp_path, tiny_data)
    report = check.run(cfg)
    folder = tmp_path / "run" / "check"
    for name in ("class_counts", "age_gender", "age_histogram", "files", "samples"):
        assert (folder / f"{name}.png").read_bytes()[:8] == PNG, name
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and not re.search(r"src=['\"](?!data:)", page)  # nothing outside
    assert f"<th>images</th><td>{report['images']}</td>" in page
    assert f"plots and report: {folder / 'report.html'}" in capsys.readouterr().out


@pytest.mark.skipif(not REAL_META.exists(), reason="../shared/data/real_meta/ is not beside this checkout")
def test_the_real_metadata_gives_its_people_level_plots(tmp_path):
    from pipeline.config import load_config

    people = pd.read_csv(REAL_META)
    people["gender"] = (people["gender"] == "female").astype(int)
    cfg = load_config("configs/base.yaml")
    images = images_of_people(people, cfg)
    assert len(people) == 2700 and len(images) == 2700 * 7
    assert np.bincount(images["mask"]).tolist() == [2700 * 5, 2700, 2700]
    assert (images["age_band"] == 2).sum() == 7 * (people["age"] >= 60).sum() == 7 * 192  # the top band: all 60
    page = write_report(tmp_path, people, None, cfg, {"people": len(people)})
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["age_gender.png", "age_histogram.png", "class_counts.png"]
    assert "Metadata only" in page.read_text()


@pytest.mark.parametrize("engine", ["albumentations", "kornia"])
def test_preview_shows_the_crop_its_augmented_draws_and_tta_views_in_the_page(tiny_data, tmp_path, engine):
    from pipeline.stages import preview

    cfg = make_config(tmp_path, tiny_data, f"augment.engine={engine}", "infer.tta=[none,hflip,'scale:1.2']")
    check.run(cfg)
    first = preview.run(cfg, images=3, draws=2)
    again = preview.run(cfg, images=3, draws=2)
    assert first["engine"] == engine and first["rows"] == again["rows"]  # seeded: the same images each time
    page = (tmp_path / "run" / "check" / "report.html").read_text()
    assert page.count("<!--section preview.png-->") == 1 and page.count("data:image/png;base64,") == 6
    crop = np.zeros((40, 32, 3), np.uint8)
    crop[:, :16] = 200
    draws = [preview.augmented(cfg, engine, crop, seed) for seed in (1, 2, 1)]
    assert np.array_equal(draws[0], draws[2]) and draws[0].shape == crop.shape
    views = preview.views(cfg, crop)
    assert np.array_equal(views[0], crop) and np.array_equal(views[1], crop[:, ::-1]) and views[2].shape == (48, 38, 3)
