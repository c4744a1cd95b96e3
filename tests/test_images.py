"""The decoded-image cache: decoded once, keyed by each file's identity plus the crop and the size."""
import os

import numpy as np
import pytest

from pipeline.data import images
from pipeline.data.layout import load_train
from tests.conftest import make_config


@pytest.fixture
def files(tmp_path, data_copy):
    table, _ = load_train(make_config(tmp_path, data_copy))
    return list(table["file"][:6])


def test_the_cache_is_reused_without_decoding_again(tmp_path, data_copy, files, monkeypatch):
    cfg = make_config(tmp_path, data_copy)
    first = images.cached_images(cfg, files)
    assert first.shape == (6, 64, 48, 3) and first.dtype == np.uint8
    monkeypatch.setattr(images, "decode_images", lambda *a, **k: pytest.fail("decoded twice"))
    np.testing.assert_array_equal(images.cached_images(cfg, files), first)


def test_a_changed_file_gets_a_new_cache_entry(tmp_path, data_copy, files):
    cfg = make_config(tmp_path, data_copy)
    before = images.cache_path(cfg, files)
    images.cached_images(cfg, files)
    stat = os.stat(files[0])
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, newer mtime
    touched = images.cache_path(cfg, files)
    assert touched != before
    with open(files[1], "ab") as handle:  # one more byte: another size
        handle.write(b"\0")
    assert images.cache_path(cfg, files) not in (before, touched)


def test_crop_and_size_are_part_of_the_key(tmp_path, data_copy, files):
    plain = make_config(tmp_path, data_copy)
    cropped = make_config(tmp_path, data_copy, "data.crop=[0.3, 0.3, 0.7, 0.7]")
    smaller = make_config(tmp_path, data_copy, "data.image_size=[24, 32]")
    paths = {images.cache_path(cfg, files) for cfg in (plain, cropped, smaller)}
    assert len(paths) == 3
    assert not np.array_equal(images.cached_images(plain, files), images.cached_images(cropped, files))
    assert images.cached_images(smaller, files).shape == (6, 32, 24, 3)
