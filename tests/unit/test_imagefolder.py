"""Image folders (ImageNet eval transform) and --calib parsing."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from ouro.calib.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CalibSpec,
    ImageFolderError,
    calibration_images,
    eval_transform,
    load_image_folder,
    parse_calib_spec,
)

TRANSFORM_ATOL = 1e-6


def _img(path, size=(40, 30), color=(255, 0, 0)):
    Image.new("RGB", size, color).save(path)


def test_eval_transform_shape_and_normalisation():
    x = eval_transform(Image.new("RGB", (300, 260), (255, 255, 255)), 224)
    assert x.shape == (3, 224, 224)
    expect = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(x[:, 100, 100], expect, atol=TRANSFORM_ATOL)
    assert eval_transform(Image.new("L", (10, 50)), 32).shape == (3, 32, 32)  # grey, tall, small


def test_corrupt_files_skipped_with_count(tmp_path, caplog):
    for i in range(3):
        _img(tmp_path / f"ok{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("hello")
    with caplog.at_level("WARNING", logger="ouro"):
        x, y = load_image_folder(tmp_path, img_size=16)
    assert x.shape == (3, 3, 16, 16) and y is None
    [rec] = [r for r in caplog.records if r.name.startswith("ouro.")]
    assert "skipped 2 file(s): 2 not readable images" in rec.getMessage() and "\n" not in rec.getMessage()


def test_class_subfolders_give_labels_and_n_is_seeded(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            _img(tmp_path / c / f"{i}.png", color=(0, 255 * (c == "dog"), 0))
    x, y = load_image_folder(tmp_path, img_size=16)
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    a, _ = load_image_folder(tmp_path, n=4, img_size=16, seed=1)
    b, _ = load_image_folder(tmp_path, n=4, img_size=16, seed=1)
    assert a.shape[0] == 4 and torch.equal(a, b)
    with pytest.raises(ImageFolderError, match="has 6 readable image"):
        load_image_folder(tmp_path, n=10, img_size=16)


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ImageFolderError, match="contains no readable image"):
        load_image_folder(tmp_path)
    with pytest.raises(ImageFolderError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


@pytest.mark.parametrize(
    "spec, calib_dir, expect",
    [
        (None, None, CalibSpec("synthetic", 128)),  # data-free by default (OuroMamba-Gen, the paper's 128 images)
        ("real:64", None, CalibSpec("real", 64)),
        ("synthetic:32", None, CalibSpec("synthetic", 32)),
        (None, "d", CalibSpec("dir", None)),
        ("real:16", "d", CalibSpec("dir", 16)),
    ],
)
def test_parse_calib_spec(spec, calib_dir, expect):
    assert parse_calib_spec(spec, calib_dir) == expect


@pytest.mark.parametrize("bad", ["real:", "imagenet:5", "real:0", "real:x"])
def test_parse_calib_spec_errors(bad):
    with pytest.raises(ImageFolderError, match="real:N or synthetic:N|must be >= 1"):
        parse_calib_spec(bad)


def test_real_needs_the_demo():
    class M:
        class cfg:
            img_size = 16

    with pytest.raises(ImageFolderError, match="--calib-dir"):
        calibration_images(M(), CalibSpec("real", 4), demo=False)
