"""ImageNet-style data: the standard transforms and the worker-fed loader path through the CLI."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.cli import main
from fastkd.data.transforms import EvalTransform, TrainTransform, _crop_box


def test_crop_box_stays_inside_and_covers_the_asked_area():
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = _crop_box(300, 200, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + w <= 300 and 0 <= top and top + h <= 200
        assert 0.08 * 300 * 200 * 0.98 <= w * h <= 300 * 200
    assert _crop_box(10, 10, (0.99, 1.0), (10.0, 11.0), rng) == (0, 0, 10, 10)  # impossible aspect: centre square


def test_transforms_shapes_and_centre_crop_values():
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, 30:] = 255  # right half white
    image = Image.fromarray(pixels)
    out = TrainTransform(32, rng=random.Random(1))(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    val = EvalTransform(32, crop_fraction=1.0, mean=(0, 0, 0), std=(255, 255, 255))(image)
    assert val.shape == (3, 32, 32)
    # shorter side 40 → 32: width 48, centre crop drops 8 columns each side; left half black, right white
    assert val[:, :, :12].max().item() == pytest.approx(0.0, abs=0.02)
    assert val[:, :, 20:].min().item() == pytest.approx(1.0, abs=0.02)


def make_tree(root, sizes=((40, 30), (50, 44), (36, 60))):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes * (3 if split == "train" else 1)):
                pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                pixels[..., c] += 150  # the class shows in one channel
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_of_mixed_sizes_trains_through_workers(tmp_path, capsys):
    make_tree(tmp_path / "tree")
    args = ["train", "imagenet_r34_r18", f"data.root={tmp_path / 'tree'}", "data.image_size=32",
            "data.batch_size=6", "data.num_workers=2", "student.name=resnet8", "epochs=2", "channels_last=false",
            "schedule.milestones=[10]", "optim.lr=0.05", "--output", str(tmp_path / "run"), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epoch=2" in out and "test_top1=" in out
    assert (tmp_path / "run" / "last.pt").is_file()
