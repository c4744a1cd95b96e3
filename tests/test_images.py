"""The decoded-image cache: decoded once, keyed by the images' bytes plus the crop rule and the size."""
import os

import numpy as np
import pytest

from pipeline.data import images
from pipeline.data.layout import load_train
from pipeline.data.pixels import image_set
from tests.conftest import make_config


@pytest.fixture
def file_list(tmp_path, data_copy):
    table, _ = load_train(make_config(tmp_path, data_copy))
    return list(table["file"][:6])


@pytest.fixture
def files(tmp_path, data_copy, file_list):
    return image_set(make_config(tmp_path, data_copy), "train", file_list)


def test_the_cache_is_reused_without_decoding_again(tmp_path, data_copy, files, monkeypatch):
    cfg = make_config(tmp_path, data_copy)
    first = images.cached_images(cfg, files)
    assert first.shape == (6, 64, 48, 3) and first.dtype == np.uint8
    monkeypatch.setattr(images, "decode_images", lambda *a, **k: pytest.fail("decoded twice"))
    np.testing.assert_array_equal(images.cached_images(cfg, files), first)


def test_a_file_replaced_in_place_gets_a_new_cache_entry_even_with_its_size_and_mtime(tmp_path, data_copy, file_list):
    cfg = make_config(tmp_path, data_copy)
    before = images.cache_path(cfg, image_set(cfg, "train", file_list))
    stat = os.stat(file_list[0])
    os.utime(file_list[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, newer mtime: same pixels
    assert images.cache_path(cfg, image_set(cfg, "train", file_list)) == before
    data = bytearray(open(file_list[1], "rb").read())
    data[-3] ^= 0xFF  # other bytes, same size ...
    stat = os.stat(file_list[1])
    open(file_list[1], "wb").write(bytes(data))
    os.utime(file_list[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the old mtime, as cp -p would keep
    assert images.cache_path(cfg, image_set(cfg, "train", file_list)) != before


def test_a_copy_of_the_data_under_another_root_reuses_the_cache(tmp_path, data_copy, file_list):
    import shutil

    cfg = make_config(tmp_path, data_copy)
    moved = tmp_path / "moved"
    shutil.copytree(data_copy, moved)  # new mtimes, same bytes
    other = make_config(tmp_path, moved)
    moved_files = [f.replace(str(data_copy), str(moved)) for f in file_list]
    assert images.cache_path(cfg, image_set(cfg, "train", file_list)) == \
        images.cache_path(other, image_set(other, "train", moved_files))


def test_crop_and_size_are_part_of_the_key(tmp_path, data_copy, files):
    plain = make_config(tmp_path, data_copy)
    cropped = make_config(tmp_path, data_copy, "data.crop.box=[0.3, 0.3, 0.7, 0.7]")
    smaller = make_config(tmp_path, data_copy, "data.image_size=[24, 32]")
    paths = {images.cache_path(cfg, files) for cfg in (plain, cropped, smaller)}
    assert len(paths) == 3
    assert not np.array_equal(images.cached_images(plain, files), images.cached_images(cropped, files))
    assert images.cached_images(smaller, files).shape == (6, 32, 24, 3)


def _png_claiming(path, width: int, height: int) -> None:
    """A small valid-looking PNG whose header claims width x height pixels (a decompression bomb's header)."""
    import struct
    import zlib

    import cv2

    data = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR crc over type + fields
    path.write_bytes(bytes(data))


def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(tmp_path, data_copy, file_list):
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, 30000, 30000)
    with pytest.raises(images.DataError, match=r"bomb.png: 30000x30000 pixels is more than data.max_image_pixels"):
        images.decode_file(bomb, max_pixels=16_777_216)
    problems = images.verify_images([bomb, file_list[0]], max_pixels=16_777_216, workers=1)
    assert len(problems) == 1 and "bomb.png" in problems[0]
    # the cap is the config's: a real image above a small cap is refused too, naming the key
    assert "data.max_image_pixels (1024)" in images.verify_images([file_list[0]], max_pixels=1024, workers=1)[0]


def test_grey_and_rgba_images_decode_to_rgb(tmp_path):
    import cv2

    grey, rgba = tmp_path / "grey.png", tmp_path / "rgba.png"
    cv2.imwrite(str(grey), np.full((10, 12), 200, np.uint8))
    cv2.imwrite(str(rgba), np.full((10, 12, 4), 100, np.uint8))
    for path in (grey, rgba):
        image = images.decode_file(path, max_pixels=10**6)[0]
        assert image.shape == (10, 12, 3) and image.dtype == np.uint8
