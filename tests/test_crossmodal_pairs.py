"""Cross-modal pairs stored as separate files (issue 18, item 2): an RGB tree and a depth tree whose files share a
stem, stacked as channels of the in-memory cache (``data.pair_root``), views of one augmented batch sharing the
crop and flip, the errors, the cache's fingerprint of the partners, and an RGB teacher distilled into a depth
student with CRD through the CLI."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.cli import main
from fastkd.data.arrays import fit_images
from fastkd.data.device import crop_flip
from fastkd.data.folder import ImageFolder
from fastkd.train.recipe import load_recipe
from fastkd.train.run import loaders, make_trainer

CLASSES = ("cat", "dog", "owl")


def rgb_pixels(rng, label: int) -> np.ndarray:
    return (rng.rand(8, 8, 3) * 150 + 50 * label).astype(np.uint8)


def depth_pixels(rng, label: int) -> np.ndarray:
    """A grey ramp, brighter for a higher label, with noise: never constant."""
    ramp = np.linspace(0, 90, 8)[None, :] + np.linspace(0, 40, 8)[:, None]
    return (ramp + 60 * label + rng.rand(8, 8) * 20).astype(np.uint8)


def make_pairs(root, per_split=(("train", 4), ("val", 2)), seed=0):
    """root/rgb/{train,val}/<class>/<i:04d>.jpg (RGB, 8 x 8) and root/depth/... /<i:04d>.png (greyscale, 8 x 8)."""
    rng = np.random.RandomState(seed)
    for split, n in per_split:
        for label, name in enumerate(CLASSES):
            for tree in ("rgb", "depth"):
                os.makedirs(root / tree / split / name, exist_ok=True)
            for i in range(n):
                Image.fromarray(rgb_pixels(rng, label)).save(root / "rgb" / split / name / f"{i:04d}.jpg")
                Image.fromarray(depth_pixels(rng, label)).save(root / "depth" / split / name / f"{i:04d}.png")
    return root / "rgb", root / "depth"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def pairs(tmp_path, cache):
    return make_pairs(tmp_path)


def pixels(path, mode: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert(mode))


def recipe_for(rgb, depth, *overrides):
    return load_recipe("custom_crossmodal_pairs", [f"data.root={rgb}", f"data.pair_root={depth}", "data.batch_size=8",
                                                   "epochs=1", *overrides])


def test_partners_are_stacked_after_the_images_as_their_files_hold_them(pairs, tmp_path):
    rgb, depth = pairs
    folder = ImageFolder(rgb / "train", cache=True, pair_root=depth / "train", num_workers=2)
    assert folder.data.shape == (12, 8, 8, 4) and folder.pair_channels == 1 and len(folder.partners) == 12
    for i, (path, label) in enumerate(folder.samples):
        stem = os.path.splitext(os.path.relpath(path, rgb / "train"))[0]
        assert folder.partners[i] == str(depth / "train" / f"{stem}.png") and CLASSES[label] in stem
        assert np.array_equal(folder.data[i, ..., :3], pixels(path, "RGB"))
        assert np.array_equal(folder.data[i, ..., 3], pixels(folder.partners[i], "L"))
    # a colour partner tree adds 3 channels (the greyscale one repeated where a file is grey); sizes fitted alike
    colour = tmp_path / "colour" / "train"
    for path in folder.partners:
        target = colour / os.path.relpath(path, depth / "train")
        os.makedirs(target.parent, exist_ok=True)
        Image.fromarray(np.repeat(pixels(path, "L")[..., None], 3, axis=-1) // 2).save(target.with_suffix(".bmp"))
    both = ImageFolder(rgb / "train", cache=True, pair_root=colour, size=4)
    assert both.data.shape == (12, 4, 4, 6) and both.pair_channels == 3
    assert np.array_equal(both.data[..., :3], fit_images(folder.data[..., :3], 4))
    assert np.array_equal(both.data[..., 3:], fit_images(np.repeat(folder.data[..., 3:] // 2, 3, axis=-1), 4))


def test_the_depth_view_and_the_rgb_view_share_the_crop_and_flip_pixel_for_pixel(pairs):
    rgb, depth = pairs
    recipe = recipe_for(rgb, depth)
    train, test, classes, num_data = loaders(recipe, torch.device("cpu"), None)
    assert classes == list(CLASSES) and num_data == 12 and len(test.dataset) == 6
    split = train.inputs
    assert split.order == ("depth", "rgb") and split.slices == {"depth": slice(0, 1), "rgb": slice(1, 4)}
    x, _, index = next(iter(train))
    assert x.shape == (8, 4, 8, 8)
    # the loader's draws, in its documented order (fastkd.data.device), give the crops both views must show
    g = train.generator(0)
    order = torch.randperm(12, generator=g)
    top, left = torch.randint(0, 9, (8,), generator=g), torch.randint(0, 9, (8,), generator=g)
    flip = torch.randint(0, 2, (8,), generator=g).bool()
    assert torch.equal(index, order[:8])
    assert bool(flip.any()) and bool((~flip).any()) and bool((top != 4).any()) and bool((left != 4).any())
    crops = crop_flip(train.dataset.images[index], top, left, flip, 4).permute(0, 3, 1, 2).double() / 255.0
    raw = x.double() * split.std.double()[:, None, None] + split.mean.double()[:, None, None]
    assert (raw[:, 0:1] - crops[:, 3:4]).abs().max() < 1e-6  # the student's depth: the partner file's crop
    assert (raw[:, 1:4] - crops[:, 0:3]).abs().max() < 1e-6  # the teacher's rgb: the same crop of the image
    # end to end: a flipped sample's views are the crop of its two files, cut and mirrored here by hand
    files = ImageFolder(rgb / "train", cache=True, pair_root=depth / "train")
    b = int(torch.nonzero(flip)[0])
    for view, path, mode in ((raw[b, 0:1], files.partners[index[b]], "L"),
                             (raw[b, 1:4], files.samples[index[b]][0], "RGB")):
        padded = np.pad(pixels(path, mode).reshape(8, 8, -1), ((4, 4), (4, 4), (0, 0)))
        window = padded[int(top[b]):int(top[b]) + 8, int(left[b]):int(left[b]) + 8][:, ::-1]
        assert np.array_equal(np.rint(view.permute(1, 2, 0).numpy() * 255).astype(np.uint8), window)
    # the built-in views read the images' channels, not the partners': L of the stored RGB
    lab = loaders(recipe_for(rgb, depth, "data.teacher_view=L"), torch.device("cpu"), None)[0].inputs
    assert lab.order == ("depth", "L") and lab.channels == 2 and lab.colour == 3


def test_a_sample_without_a_partner_is_named(pairs):
    rgb, depth = pairs
    os.remove(depth / "val" / "dog" / "0001.png")
    with pytest.raises(ValueError, match=r"data.pair_root: .*val/dog/0001.jpg has no partner: no image file "
                                         r".*depth/val/dog/0001.<ext>"):
        loaders(recipe_for(rgb, depth), torch.device("cpu"), None)


def test_two_partners_with_one_stem_are_refused(pairs):
    rgb, depth = pairs
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(depth / "train" / "owl" / "0002.tif")
    with pytest.raises(ValueError, match=r"data.pair_root: .*train/owl/0002.jpg has 2 partners with the stem "
                                         r"'owl/0002' \(.*0002.png, .*0002.tif\): keep one"):
        loaders(recipe_for(rgb, depth), torch.device("cpu"), None)


def test_two_images_with_one_stem_are_refused(pairs):
    rgb, depth = pairs
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb / "train" / "cat" / "0000.png")
    with pytest.raises(ValueError, match=r"data.pair_root: .*cat/0000.jpg and .*cat/0000.png share the stem "
                                         r"'cat/0000'"):
        loaders(recipe_for(rgb, depth), torch.device("cpu"), None)


def test_a_partner_of_another_size_needs_image_size(pairs):
    rgb, depth = pairs
    Image.fromarray(np.full((6, 7), 9, np.uint8)).save(depth / "train" / "dog" / "0003.png")
    with pytest.raises(ValueError, match=r"data.pair_root: .*depth/train/dog/0003.png is 7x6 but its image "
                                         r".*rgb/train/dog/0003.jpg is 8x8: .*data.image_size=N"):
        loaders(recipe_for(rgb, depth), torch.device("cpu"), None)
    train, *_ = loaders(recipe_for(rgb, depth, "data.image_size=8"), torch.device("cpu"), None)
    stored = train.dataset.images[7, ..., 3].numpy()  # dog/0003: samples are sorted by class, then path
    assert np.array_equal(stored, fit_images(np.full((1, 6, 7, 1), 9, np.uint8), 8)[0, ..., 0])


@pytest.mark.parametrize("overrides, error, message", [
    (["data.in_memory=false"], ValueError,
     r"data.pair_root=.* needs data.in_memory=true: .*\(streamed trees, data.in_memory=false, take no views\)"),
    (["data.name=cifar10"], ValueError, r"data.pair_root pairs the files of an image tree \(data.name=imagefolder\), "
                                        r"not data.name=cifar10"),
    (["data.view=null", "data.teacher_view=null"], ValueError, r"data.pair_root=.* stacks the partners' channels .*"
                                                               r"data.view"),
])
def test_recipe_errors_name_the_key(pairs, overrides, error, message):
    rgb, depth = pairs
    with pytest.raises(error, match=message):
        recipe_for(rgb, depth, *overrides)


def test_a_missing_pair_tree_or_view_channel_is_named(pairs, tmp_path):
    rgb, depth = pairs
    with pytest.raises(FileNotFoundError, match=r"data.pair_root: .*nowhere/train' is not a folder"):
        loaders(recipe_for(rgb, tmp_path / "nowhere"), torch.device("cpu"), None)
    with pytest.raises(ValueError, match=r"data.views.depth reads channels \[4\] but the images have 4"):
        loaders(recipe_for(rgb, depth, "data.views={depth: [4]}"), torch.device("cpu"), None)
    with pytest.raises(ValueError, match=r"data.views names \['rgb'\] are built-in views .*with data.pair_root"):
        loaders(recipe_for(rgb, depth, "data.views={rgb: [0, 1, 2], depth: [3]}"), torch.device("cpu"), None)
    with pytest.raises(ValueError, match="pair_root .* needs cache=True"):
        ImageFolder(rgb / "train", pair_root=depth / "train")


def test_the_cache_covers_the_partners_and_is_rebuilt_when_one_changes(pairs, cache, monkeypatch):
    rgb, depth = pairs
    first = ImageFolder(rgb / "train", cache=True, pair_root=depth / "train")
    alone = ImageFolder(rgb / "train", cache=True)
    assert first.cache_path != alone.cache_path and os.path.isfile(first.cache_path)
    assert np.array_equal(first.data[..., :3], alone.data) and alone.pair_channels == 0
    decoded = []
    real = ImageFolder._decode
    monkeypatch.setattr(ImageFolder, "_decode", lambda self, path: decoded.append(path) or real(self, path))
    again = ImageFolder(rgb / "train", cache=True, pair_root=depth / "train")
    assert decoded == [] and np.array_equal(again.data, first.data) and again.pair_channels == 1
    changed = depth / "train" / "owl" / "0001.png"
    before = os.path.getsize(changed)
    noise = np.random.RandomState(5).randint(0, 256, (8, 8)).astype(np.uint8)
    Image.fromarray(noise).save(changed)
    assert os.path.getsize(changed) != before  # the fingerprint reads sizes, as the image tree's does
    rebuilt = ImageFolder(rgb / "train", cache=True, pair_root=depth / "train")
    assert len(decoded) == 24  # every image and every partner decoded again
    i = rebuilt.partners.index(str(changed))
    assert np.array_equal(rebuilt.data[i, ..., 3], noise) and not np.array_equal(first.data[i, ..., 3], noise)
    assert np.array_equal(np.delete(rebuilt.data, i, 0), np.delete(first.data, i, 0))
    # written atomically, as the image cache always is: no temporary file is left beside it
    assert [f for f in os.listdir(cache / "images") if f.endswith(".tmp")] == []


def test_an_rgb_teacher_distils_a_depth_student_with_crd_through_the_cli(pairs, tmp_path):
    rgb, depth = pairs
    data = [f"data.root={rgb}", f"data.pair_root={depth}", "data.batch_size=8", "epochs=1"]
    teacher = tmp_path / "teacher"
    assert main(["train", "custom_crossmodal_pairs", *data, "data.view=rgb", "student.name=resnet8",
                 "--output", str(teacher), "--device", "cpu"]) == 0
    run = tmp_path / "crd"
    small = ["student.name=resnet8", "teacher.name=resnet8", f"teacher.checkpoint={teacher / 'last.pt'}",
             "losses.crd.num_negatives=8", "losses.crd.feat_dim=16"]
    assert main(["distill", "custom_crossmodal_pairs", *data, *small, "--output", str(run), "--device", "cpu"]) == 0
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["train_loss"]) and metrics[0]["train_crd"] > 0
    # each network reads its own view of the stacked batch: the student 1 depth channel, the teacher 3 rgb ones
    trainer = make_trainer(load_recipe("custom_crossmodal_pairs", [*data, *small, f"output={tmp_path / 'again'}"]),
                           "cpu")
    student, loaded = trainer.distiller.student, trainer.distiller.teacher
    assert student.conv1.weight.shape[1] == 1 and loaded.conv1.weight.shape[1] == 3
    assert student.fastkd_view == (0, 1, 4) and loaded.fastkd_view == (1, 4, 4)
    teacher_run = [json.loads(line) for line in open(teacher / "metrics.jsonl")][-1]
    assert trainer.evaluate(model=loaded)["top1"] == pytest.approx(teacher_run["test_top1"])
