"""The embedded demo: the fixed digits split, and the shipped demo model against its card."""
from __future__ import annotations

import pytest
import torch

from ouro.calib.checkpoint import infer_config
from ouro.calib.data import SPLIT_SIZES, demo_card, demo_files, evaluate_top1, load_demo_model, load_digits_split, split_indices
from ouro.calib.models.vim import VimConfig

TARGET_TOP1 = 95.0  # issue 3: FP test top-1 of the demo model
TOP1_TOL = 100.0 / SPLIT_SIZES["test"]  # one test image: a last-bit difference on another CPU may flip one argmax
MAX_CKPT_BYTES = 5 * 1024 * 1024


def test_split_sizes_and_shapes():
    for split, n in SPLIT_SIZES.items():
        x, y = load_digits_split(split)
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert set(y.unique().tolist()) == set(range(10))


def test_split_is_fixed_and_disjoint():
    idx = split_indices()
    train, test, calib = (set(idx[k].tolist()) for k in ("train", "test", "calib"))
    assert not train & test
    assert len(train | test) == 1797
    assert calib <= train and len(calib) == SPLIT_SIZES["calib"]
    x1, y1 = load_digits_split("test")
    x2, y2 = load_digits_split("test")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_train_split_is_normalised():
    x, _ = load_digits_split("train")
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown digits split 'val'"):
        load_digits_split("val")


def test_evaluate_top1_counts():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class 3 for every image
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    labels = torch.tensor([3, 3, 1, 3, 0])
    assert evaluate_top1(Fixed(), torch.zeros(5, 3, 32, 32), labels, batch_size=2, progress=False) == pytest.approx(60.0)


def test_demo_checkpoint_is_official_format():
    ckpt, _ = demo_files()
    assert ckpt.stat().st_size < MAX_CKPT_BYTES
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(obj) == {"model"}
    cfg = VimConfig(**demo_card()["config"])
    inferred = infer_config(obj["model"])
    assert VimConfig(**{**inferred.to_dict(), "name": cfg.name}) == cfg


def test_demo_model_top1_matches_card():
    card = demo_card()
    x, y = load_digits_split("test")
    top1 = evaluate_top1(load_demo_model(), x, y, progress=False)
    assert top1 == pytest.approx(card["fp_test_top1"], abs=TOP1_TOL)
    assert top1 >= TARGET_TOP1
