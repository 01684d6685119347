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


def _batches(loader, epoch):
    loader.set_epoch(epoch)
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_streamed_batches_are_a_function_of_seed_epoch_and_step(tmp_path):
    """Crops, flips and contrast indices do not depend on the workers, and differ between epochs."""
    from fastkd.data.folder import ImageFolder
    from fastkd.data.indexed import IndexedDataset
    from fastkd.train.run import StreamedLoader

    make_tree(tmp_path / "tree")

    def loader(workers):
        rng = random.Random()
        data = IndexedDataset(ImageFolder(tmp_path / "tree" / "train", TrainTransform(16, rng=rng)), 5, seed=3)
        return StreamedLoader(data, 4, shuffle=True, num_workers=workers, seed=7, pin_memory=False, rng=rng)

    inline, workers = loader(0), loader(2)
    for epoch in (0, 1):
        a, b = _batches(inline, epoch), _batches(workers, epoch)
        assert len(a) == len(b) == 4  # 18 samples, batch 4, the last partial batch dropped
        for x, y in zip(a, b):
            for u, v in zip(x, y):
                assert torch.equal(u, v)
    first, second = _batches(inline, 0), _batches(inline, 1)
    assert not torch.equal(first[0][0], second[0][0])
    assert torch.equal(_batches(workers, 0)[2][0], first[2][0])  # epoch 0 again, after epoch 1: the same pixels


def test_streamed_resume_replays_the_uninterrupted_run(tmp_path):
    from fastkd.train.checkpoint import load_checkpoint

    make_tree(tmp_path / "tree")
    common = ["imagenet_r34_r18", f"data.root={tmp_path / 'tree'}", "data.image_size=32", "data.batch_size=6",
              "data.num_workers=2", "student.name=resnet8", "channels_last=false", "schedule.milestones=[10]",
              "optim.lr=0.05", "epochs=2", "--device", "cpu"]
    assert main(["train", *common, "--output", str(tmp_path / "straight")]) == 0
    assert main(["train", *common, "epochs=1", "--output", str(tmp_path / "cut")]) == 0
    # resumes from cut/last.pt: epochs changed, so the continuation is asked for explicitly
    assert main(["train", *common, "--resume", "--output", str(tmp_path / "cut")]) == 0
    straight = load_checkpoint(str(tmp_path / "straight" / "last.pt"))
    resumed = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    for key, value in straight["student"].items():
        assert torch.equal(resumed["student"][key], value), key


def test_close_stops_the_workers_and_a_later_epoch_restarts_them(tmp_path):
    """close() shuts the persistent workers down at once (left to the garbage collector, they used to wait
    out a join timeout each); the loader still works afterwards."""
    from fastkd.data.folder import ImageFolder
    from fastkd.train.run import StreamedLoader

    make_tree(tmp_path / "tree")
    data = ImageFolder(tmp_path / "tree" / "train", EvalTransform(16))
    loader = StreamedLoader(data, 4, shuffle=False, num_workers=2, seed=0, pin_memory=False)
    first = _batches(loader, 0)
    workers = list(loader.loader._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    loader.close()
    assert not any(w.is_alive() for w in workers)
    loader.close()  # a second close is a no-op
    again = _batches(loader, 0)
    assert len(again) == len(first) and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    loader.close()
