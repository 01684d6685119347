"""Your own data (issue 20): image trees of any size and channel count, the zoo at any input size, data.image_size /
fit / mean / std, the val/ vs test/ rule, model checks, budget warnings, epochs counted as the papers count them,
the custom recipes end to end."""
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import fastkd
from fastkd import models
from fastkd.cli import main
from fastkd.data.arrays import fit_images
from fastkd.data.folder import evaluation_folder
from fastkd.train.checkpoint import load_checkpoint
from fastkd.train.recipe import budget_warnings, load_recipe
from fastkd.train.run import loaders
from tests._helpers import cli_error

CIFAR_ZOO = ["resnet8", "resnet32x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet8_mb3"]


def make_tree(root, shape, per_class=(12, 4, 4), classes=("coat", "shirt"), seed=0, splits=("train", "val", "test")):
    """root/{train,val,test}/<class>/<i>.png of ``shape`` (H, W) greyscale or (H, W, 3) RGB; class 1 is brighter,
    and the val/ and test/ images differ (test/ is all black) so a test can tell which one was read."""
    rng = np.random.RandomState(seed)
    for split, n in zip(splits, per_class):
        for label, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(n):
                pixels = (rng.rand(*shape) * 120 + 100 * label).astype(np.uint8)
                if split == "test":
                    pixels[:] = 0
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name", CIFAR_ZOO)
def test_the_zoo_takes_any_input_size_and_is_the_published_model_at_32(name):
    model = models.create(name, num_classes=10).eval()
    torch.manual_seed(0)
    for shape in ((28, 28), (40, 30), (20, 20)):
        with torch.no_grad():
            out = model(torch.randn(2, 3, *shape))
        assert (out if torch.is_tensor(out) else out[0]).shape[-1] == 10
    # at 32 x 32 the global pooling is the published fixed one, to the bit
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ours = model(x)
    fixed = {"resnet8": 8, "resnet32x4": 8, "wrn_16_2": 8, "ShuffleV1": 4, "ShuffleV2": 4, "MobileNetV2": 2}
    if name in fixed:
        published = F.avg_pool2d if name in ("wrn_16_2", "ShuffleV1", "ShuffleV2") else None
        with pytest.MonkeyPatch.context() as patch:
            if published is not None:
                module = {"wrn_16_2": "wrn", "ShuffleV1": "shufflenetv1", "ShuffleV2": "shufflenetv2"}[name]
                patch.setattr(f"fastkd.models.{module}.global_avg_pool", lambda t: F.avg_pool2d(t, fixed[name]))
            else:
                patch.setattr(model, "avgpool", nn.AvgPool2d(fixed[name], ceil_mode=name == "MobileNetV2"))
            with torch.no_grad():
                theirs = model(x)
        assert torch.equal(ours, theirs)


def test_fit_images_resize_pad_crop():
    image = np.zeros((1, 20, 40, 1), dtype=np.uint8)
    image[:, :, :20] = 200  # left half bright
    assert fit_images(image, 20, "resize").shape == (1, 20, 20, 1)
    padded = fit_images(image, 20, "pad")[0, :, :, 0]  # 10 x 20 in the middle, black bands above and below
    assert (padded[:5] == 0).all() and (padded[-5:] == 0).all() and padded[5:15, :9].min() == 200
    cropped = fit_images(image, 20, "crop")[0, :, :, 0]  # the centre 20 x 20 of the 20 x 40 image
    assert cropped[:, :9].min() == 200 and cropped[:, 11:].max() == 0
    assert fit_images(image[:, :20, :20], 20, "pad") is not None
    with pytest.raises(ValueError, match="fit must be one of"):
        fit_images(image, 20, "stretch")


def test_a_greyscale_tree_stays_one_channel_and_is_repeated_per_batch(tmp_path, cache):
    root = make_tree(tmp_path / "fashion", (28, 28))
    recipe = load_recipe("custom", [f"data.root={root}", "data.batch_size=8"])
    train, test, classes, n = loaders(recipe, torch.device("cpu"), None)
    assert classes == ["coat", "shirt"] and n == 24 and len(test.dataset) == 8
    assert train.dataset.images.shape == (24, 28, 28, 1)  # a third of RGB's bytes
    images = next(iter(train))[0]
    assert images.shape == (8, 3, 28, 28) and torch.equal(images[:, 0], images[:, 2])
    assert str(train.dataset.mean.numpy().round(3)) != str((0.485 * 255,))  # its own statistics, not ImageNet's
    assert os.listdir(cache / "images") and not any(f.startswith(".fastkd") for f in os.listdir(root / "train"))


def test_image_size_fit_mean_and_std_are_honoured_in_memory(tmp_path, cache):
    root = make_tree(tmp_path / "rgb", (30, 40, 3))  # 40 wide, 30 high
    base = [f"data.root={root}", "data.batch_size=4"]
    with pytest.raises(ValueError, match="give the images one size"):
        make_tree(tmp_path / "rgb", (32, 32, 3), per_class=(1, 0, 0), seed=1, classes=("coat",))
        loaders(load_recipe("custom", base), torch.device("cpu"), None)
    for fit in ("resize", "pad", "crop"):
        train, test, _, _ = loaders(load_recipe("custom", [*base, "data.image_size=24", f"data.fit={fit}"]),
                                    torch.device("cpu"), None)
        assert train.dataset.images.shape[1:] == (24, 24, 3) and test.dataset.images.shape[1:] == (24, 24, 3)
    given = load_recipe("custom", [*base, "data.image_size=24", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.2, 0.1]"])
    train, test, _, _ = loaders(given, torch.device("cpu"), None)
    assert train.dataset.mean.tolist() == [127.5] * 3 and test.dataset.std.tolist() == pytest.approx([63.75, 51.0, 25.5])
    with pytest.raises(ValueError, match="data.mean has 1 value.* 3 channel"):
        loaders(load_recipe("custom", [*base, "data.image_size=24", "data.mean=[0.5]", "data.std=[0.2]"]),
                torch.device("cpu"), None)
    digits = loaders(load_recipe("digits", ["data.image_size=40"]), torch.device("cpu"), None)[0]
    assert digits.dataset.images.shape[1:] == (40, 40, 3)  # not a multiple of 8: resized from 32


def test_val_is_the_held_out_split_whenever_it_exists(tmp_path, cache):
    root = make_tree(tmp_path / "both", (28, 28))
    assert evaluation_folder(str(root)) == str(root / "val")
    _, test, _, _ = loaders(load_recipe("custom", [f"data.root={root}", "data.batch_size=8"]), torch.device("cpu"), None)
    assert test.dataset.images.float().mean() > 0  # val/ (the test/ images are black)
    streamed = load_recipe("custom", [f"data.root={root}", "data.in_memory=false", "data.image_size=24",
                                      "data.batch_size=8"])
    _, test, _, _ = loaders(streamed, torch.device("cpu"), None)
    assert test.dataset.root == str(root / "val")
    only_test = make_tree(tmp_path / "no_val", (28, 28), splits=("train", "test"))
    assert evaluation_folder(str(only_test)) == str(only_test / "test")


def test_fastkd_stats_prints_the_overrides(tmp_path, cache, capsys):
    root = make_tree(tmp_path / "fashion", (28, 28))
    assert main(["stats", str(root)]) == 0
    out = capsys.readouterr().out
    mean, std = (float(v) for v in re.findall(r"data\.\w+=\[([\d.]+)\]", out))
    train, _, _, _ = loaders(load_recipe("custom", [f"data.root={root}", "data.batch_size=8"]), torch.device("cpu"), None)
    assert mean == pytest.approx(float(train.dataset.mean) / 255, abs=1e-4)
    assert std == pytest.approx(float(train.dataset.std) / 255, abs=1e-4)
    assert "24 images, 2 classes, 28x28, 1 channel" in out


def test_train_refuses_teacher_keys_and_a_teacher_file_of_another_model(tmp_path, capsys):
    err = cli_error(capsys, ["train", "cifar100", "teacher.name=resnet20"])
    assert "trains cifar100's student (resnet8x4) alone" in err and "student.name=" in err
    run = tmp_path / "t"
    assert main(["train", "digits", "student.name=resnet8", "epochs=1", "--device", "cpu", "--output", str(run)]) == 0
    err = cli_error(capsys, ["distill", "digits", "losses={ce: 0.1, kd: 0.9}", f"teacher.checkpoint={run}/last.pt",
                             "epochs=1", "--device", "cpu", "--output", str(tmp_path / "s")])
    assert f"holds a resnet8 (its file says so) but teacher.name is resnet20: set teacher.name=resnet8" in err
    torch.save({"model": models.create("resnet8", num_classes=10).state_dict()}, tmp_path / "repdistiller.pth")
    err = cli_error(capsys, ["distill", "digits", "losses={ce: 0.1, kd: 0.9}", f"teacher.checkpoint={tmp_path}/repdistiller.pth",
                             "epochs=1", "--device", "cpu", "--output", str(tmp_path / "r")])
    assert "does not hold weights of a resnet20" in err and "Is teacher.name right?" in err


def test_budget_warnings_say_what_a_short_run_never_reaches():
    assert budget_warnings(load_recipe("cifar100_dkd")) == []
    short = budget_warnings(load_recipe("cifar100_dkd", ["epochs=2"]))
    assert short[0].startswith("schedule.milestones [150, 180, 210] are at or past epochs=2")
    assert short[1].startswith("losses.dkd.warmup=20 is longer than epochs=2")
    assert budget_warnings(load_recipe("cifar100_dkd", ["epochs=2", "schedule.milestones=[1]",
                                                        "losses.dkd.warmup=2"])) == []


@pytest.mark.parametrize("epoch, want", [(1, 1 / 20), (2, 2 / 20), (240, 1.0)])
def test_dkd_weighs_epoch_e_as_mdistiller(epoch, want):
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g), torch.randint(0, 10, (4,), generator=g)
    full = fastkd.DKDLoss()(s, t, y)
    assert fastkd.DKDLoss()(s, t, y, epoch=epoch).item() == pytest.approx(want * full.item(), rel=1e-6)


@pytest.mark.parametrize("epoch, published", [(1, 0), (2, 1), (300, 299)])
def test_okddip_ramps_epoch_e_as_its_code_counts(epoch, published):
    import math

    torch.manual_seed(0)
    loss = fastkd.OKDDipLoss(in_dim=6, ramp_epochs=80).double()
    logits, pooled = torch.randn(4, 5, 7, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64)
    full = loss(logits, pooled).item()
    ramp = math.exp(-5 * (1 - min(published / 80, 1)) ** 2)
    assert loss(logits, pooled, epoch=epoch).item() == pytest.approx(ramp * full, rel=1e-12)


def test_the_engine_hands_the_losses_epochs_counted_from_1(tmp_path):
    from tests.test_engine import make

    trainer = make({"ce": {"weight": 1.0}, "dkd": {"weight": 1.0}}, tmp_path, epochs=2)
    seen = []
    forward = trainer.step_module.forward

    def spy(*args, epoch=None, **kwargs):
        seen.append(epoch)
        return forward(*args, epoch=epoch, **kwargs)

    trainer.step_module.forward = spy
    trainer.fit(log=None)
    assert sorted(set(seen)) == [1, 2] and seen[0] == 1  # the first epoch is epoch 1, as in mdistiller


def test_a_greyscale_tree_trains_and_distils_with_the_custom_recipes(tmp_path, cache, capsys, monkeypatch):
    """The README's walk-through on a 28 x 28 greyscale tree: a teacher, then KD, in copyable commands."""
    monkeypatch.chdir(tmp_path)
    root = make_tree(tmp_path / "fashion", (28, 28), per_class=(32, 8, 8))
    short = ["epochs=1", "schedule.name=cosine", "data.batch_size=16", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a short run with its own schedule: nothing to warn about
        assert main(["train", "custom", f"data.root={root}", "student.name=resnet8", *short, "--output", "runs/teacher"]) == 0
    out = capsys.readouterr().out
    assert f"data: imagefolder ({root}): 2 classes, 64 training / 16 test images, 28x28x1, repeated to 3 channels" in out
    assert main(["distill", "custom_kd", f"data.root={root}", "teacher.name=resnet8", "teacher.checkpoint=runs/teacher/last.pt",
                 *short]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^resnet8x4 \+ KD\s+\d", out, re.M)  # the table names the run by model and method
    (run,) = [os.path.join("runs/custom_kd", d) for d in os.listdir("runs/custom_kd")]
    assert load_checkpoint(os.path.join(run, "last.pt"))["meta"]["classes"] == ["coat", "shirt"]
    assert main(["export", run]) == 0 and main(["eval", run, "--device", "cpu"]) == 0


def test_the_step_schedule_decays_where_repdistillers_does():
    """RepDistiller's adjust_learning_rate(epoch), epoch counted from 1: lr × 0.1^(#milestones < epoch), so
    epoch 150 still runs at 0.05 and epoch 151 at 0.005. The engine's epoch counts from 0 (fractional inside it)."""
    from fastkd.train.engine import learning_rate

    recipe = load_recipe("cifar100")
    published = {e: 0.05 * 0.1 ** sum(e > m for m in (150, 180, 210)) for e in (1, 150, 151, 180, 181, 240)}
    for epoch, lr in published.items():
        assert learning_rate(recipe, epoch - 1) == pytest.approx(lr) == pytest.approx(learning_rate(recipe, epoch - 0.01))
