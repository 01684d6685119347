"""Cross-modal transfer (issue 18): the colour split, paired views that share the crop, each network reading
its own view, the linear probe, and every crossmodal recipe run for an epoch on the embedded data."""
from __future__ import annotations

import json
import math
import os
import tarfile

import pytest
import torch

from fastkd import models
from fastkd.cli import main
from fastkd.data.colour import lab_to_rgb, rgb_to_lab
from fastkd.data.device import DeviceDataset, DeviceLoader, crop_flip
from fastkd.data.digits import Digits, load_digits
from fastkd.data.tinted import TintedDigits
from fastkd.data.views import ViewSplit
from fastkd.models.inputs import read_view
from fastkd.train.probe import fit_linear, pooled_features, top1
from fastkd.train.recipe import load_recipe
from fastkd.train.run import make_trainer


def lab_float64(r: float, g: float, b: float) -> tuple[float, float, float]:
    """CIELab of one sRGB colour, written out from the standards (IEC 61966-2-1; CIE 15) in Python floats."""
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    rl, gl, bl = linear(r), linear(g), linear(b)
    x = (0.4124564 * rl + 0.3575761 * gl + 0.1804375 * bl) / 0.95047
    y = (0.2126729 * rl + 0.7151522 * gl + 0.0721750 * bl) / 1.0
    z = (0.0193339 * rl + 0.1191920 * gl + 0.9503041 * bl) / 1.08883

    def f(t):
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def test_lab_matches_a_float64_derivation():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(200, 3, generator=g, dtype=torch.float64)
    rgb[:20] *= 0.03  # the linear segments near black
    expected = torch.tensor([lab_float64(*map(float, c)) for c in rgb], dtype=torch.float64)
    assert torch.allclose(rgb_to_lab(rgb, dim=-1), expected, atol=1e-9, rtol=0)
    assert torch.allclose(rgb_to_lab(rgb.float(), dim=-1).double(), expected, atol=2e-3, rtol=0)


def test_lab_of_known_colours():
    lab = rgb_to_lab(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
                                  dtype=torch.float64), dim=-1)
    assert torch.allclose(lab[0], torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64), atol=2e-4)
    assert torch.allclose(lab[1], torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # sRGB red and blue, D65 (Lindbloom's calculator with the same matrix)
    assert torch.allclose(lab[2], torch.tensor([53.2408, 80.0925, 67.2032], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(lab[3], torch.tensor([32.2970, 79.1875, -107.8602], dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_lab_round_trips_to_rgb(dtype, tol):
    rgb = torch.rand(4, 3, 9, 7, generator=torch.Generator().manual_seed(1), dtype=dtype)
    assert (lab_to_rgb(rgb_to_lab(rgb)) - rgb).abs().max() < tol


def test_colour_functions_name_the_bad_argument():
    with pytest.raises(ValueError, match="rgb must have 3 channels"):
        rgb_to_lab(torch.rand(2, 4, 5, 5))
    with pytest.raises(TypeError, match="lab must be a floating-point tensor"):
        lab_to_rgb(torch.zeros(3, 2, 2, dtype=torch.uint8))


def test_paired_views_share_the_crop_and_flip_pixel_for_pixel():
    data = TintedDigits(train=True, size=16)
    split = ViewSplit(["ab", "L"]).fit(data.data)
    dataset = DeviceDataset.from_dataset(data)
    loader = DeviceLoader(dataset, 32, padding=4, flip=True, seed=3, inputs=split)
    x, _, index = next(iter(loader))
    assert x.shape == (32, 3, 16, 16)
    # the draws the loader makes, in its documented order, give the crops the views must show
    g = loader.generator(0)
    order = torch.randperm(len(dataset), generator=g)
    top, left = torch.randint(0, 9, (32,), generator=g), torch.randint(0, 9, (32,), generator=g)
    flip = torch.randint(0, 2, (32,), generator=g).bool()
    assert torch.equal(index, order[:32])
    assert bool(flip.any()) and bool((top != 4).any())
    crops = crop_flip(dataset.images[index], top, left, flip, 4).permute(0, 3, 1, 2).double() / 255.0
    raw = x.double() * split.std.double()[:, None, None] + split.mean.double()[:, None, None]
    lab = torch.cat([raw[:, 2:3], raw[:, 0:2]], dim=1)  # L from the teacher's view, ab from the student's
    assert (lab_to_rgb(lab) - crops).abs().max() * 255 < 0.02
    # each view on its own is the colour split of the same crop
    assert torch.allclose(raw[:, 2:3], rgb_to_lab(crops)[:, :1], atol=1e-3)
    assert torch.allclose(raw[:, :2], rgb_to_lab(crops)[:, 1:], atol=1e-3)


def test_views_are_normalised_per_view_and_refuse_grey_chrominance():
    data = TintedDigits(train=True, size=8)
    split = ViewSplit(["L", "ab"]).fit(data.data)
    v = split(torch.from_numpy(data.data))
    assert torch.allclose(v.double().mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(v.double().std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)
    with pytest.raises(ValueError, match="'ab' is constant"):
        ViewSplit(["ab"], pixel_max=16).fit(Digits(train=True, size=8, channels=3).data)
    with pytest.raises(ValueError, match="unknown view 'LA'"):
        ViewSplit(["LA"])
    custom = ViewSplit(["depth", "colour"], custom={"colour": [0, 1, 2], "depth": [3]})
    images = torch.randint(0, 256, (2, 4, 4, 4), dtype=torch.uint8)
    assert torch.equal(custom.raw(images)[:, 0], images[..., 3].float() / 255)


def test_a_network_reads_only_its_view():
    torch.manual_seed(0)
    model = read_view(models.create("resnet8", num_classes=10), slice(2, 3), total=3).eval()
    assert model.conv1.weight.shape[1] == 1
    x = torch.randn(2, 3, 16, 16)
    hook = model._fastkd_view_hook
    with torch.no_grad():
        out = model(x)
        hook.remove()
        assert torch.equal(out, model(x[:, 2:3]))
    again = read_view(model, slice(2, 3), total=3)
    with pytest.raises(ValueError, match="3-channel view batches, got a 1-channel batch"):
        again(x[:, :1])
    with pytest.raises(ValueError, match="do not lie in the batch's 3 channels"):
        read_view(model, slice(2, 5), total=3)


def test_linear_probe_is_near_chance_on_random_features_and_high_on_a_trained_network():
    g = torch.Generator().manual_seed(0)
    noise_x, noise_y = torch.randn(1000, 64, generator=g), torch.randint(0, 10, (1000,), generator=g)
    head, mean, std = fit_linear(noise_x[:600], noise_y[:600], 10, epochs=100)
    assert abs(top1(head, mean, std, noise_x[600:], noise_y[600:]) - 10.0) < 6.0
    # a network trained for a few seconds on the digits: its own pooled features separate the classes
    torch.manual_seed(0)
    d = load_digits(size=8, channels=3)
    net = models.create("resnet8", num_classes=10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for i in range(0, 640, 64):  # ten steps
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(d.x_train[i:i + 64]), d.y_train[i:i + 64]).backward()
        opt.step()
    train = [(d.x_train[i:i + 512], d.y_train[i:i + 512]) for i in range(0, len(d.y_train), 512)]
    train_x, train_y = pooled_features(net, train)
    test_x, test_y = pooled_features(net, [(d.x_test, d.y_test)])
    assert train_x.shape == (len(d.y_train), 64)
    head, mean, std = fit_linear(train_x, train_y, 10, epochs=100)
    assert top1(head, mean, std, test_x, test_y) > 80.0
    with pytest.raises(ValueError, match="layer=7"):
        pooled_features(net, train, layer=7)


@pytest.fixture(scope="module")
def l_teacher(tmp_path_factory):
    """A resnet8 trained for an epoch on the L view of the tinted digits at 8 x 8, through the CLI."""
    run = tmp_path_factory.mktemp("xmodal") / "teacher"
    assert main(["train", "digits_crossmodal_teacher", "epochs=1", "data.image_size=8", "student.name=resnet8",
                 "--output", str(run), "--device", "cpu"]) == 0
    return run


@pytest.mark.parametrize("recipe", ["digits_crossmodal_ab", "digits_crossmodal_l2ab_crd", "digits_crossmodal_l2ab_hint",
                                    "cifar10_crossmodal_ab", "cifar10_crossmodal_l2ab_crd",
                                    "cifar10_crossmodal_l2ab_hint", "cifar10_crossmodal_teacher"])
def test_every_crossmodal_recipe_runs_an_epoch_on_the_embedded_data(recipe, l_teacher, tmp_path):
    overrides = ["epochs=1", "data.image_size=8", "data.batch_size=128", "student.name=resnet8"]
    if recipe.startswith("cifar10"):  # the CIFAR-10 recipes on the embedded colour data
        overrides += ["data.name=tinted_digits", "data.in_memory=false"]
    if "l2ab" in recipe:
        overrides += ["teacher.name=resnet8", f"teacher.checkpoint={l_teacher / 'last.pt'}"]
    if recipe == "cifar10_crossmodal_l2ab_crd":
        overrides += ["losses.crd.num_negatives=256"]
    command = "train" if recipe.endswith(("_ab", "_teacher")) else "distill"
    run = tmp_path / "run"
    assert main([command, recipe, *overrides, "--output", str(run), "--device", "cpu"]) == 0
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["train_loss"])
    if recipe == "digits_crossmodal_l2ab_crd":
        assert metrics[0]["train_crd"] > 0
        assert main(["probe", str(run), "--epochs", "20", "--device", "cpu"]) == 0
        probe = json.load(open(run / "probe.json"))
        assert probe["view"] == "ab" and probe["train"] == 1347 and probe["test"] == 450 and 0 <= probe["top1"] <= 100
        assert main(["eval", str(run), "--device", "cpu"]) == 0


def test_the_teacher_and_student_see_their_own_views_in_a_distill_run(l_teacher, tmp_path):
    recipe = load_recipe("digits_crossmodal_l2ab_crd", ["epochs=1", "data.image_size=8", "student.name=resnet8",
                                                         "teacher.name=resnet8", f"teacher.checkpoint={l_teacher / 'last.pt'}",
                                                         f"output={tmp_path / 'run'}"])
    trainer = make_trainer(recipe, "cpu")
    distiller = trainer.distiller
    assert distiller.student.conv1.weight.shape[1] == 2 and distiller.teacher.conv1.weight.shape[1] == 1
    assert distiller.student.fastkd_view == (0, 2, 3) and distiller.teacher.fastkd_view == (2, 3, 3)
    # the teacher's accuracy on its L view of the test set is the CLI teacher run's
    teacher_run = [json.loads(line) for line in open(l_teacher / "metrics.jsonl")][-1]
    assert trainer.evaluate(model=distiller.teacher)["top1"] == pytest.approx(teacher_run["test_top1"])


def test_recipe_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown view 'LA'"):
        make_trainer(load_recipe("digits_crossmodal_ab", ["data.view=LA", "epochs=1"]), "cpu")
    with pytest.raises(ValueError, match="'ab' is constant"):
        make_trainer(load_recipe("digits_crossmodal_ab", ["data.name=digits", "epochs=1"]), "cpu")
    with pytest.raises(ValueError, match="data.in_memory=true"):
        make_trainer(load_recipe("cifar10_crossmodal_ab", ["data.root=/nonexistent", "data.in_memory=false"]), "cpu")
    with pytest.raises(ValueError, match="data.views must be"):
        load_recipe("digits_crossmodal_ab", ["data.views={depth: 3}"])


def test_the_python_api_distils_across_views_and_probes():
    """The README's Python example, two steps long."""
    from fastkd.train.distiller import Distiller
    from fastkd.train.probe import linear_probe

    torch.manual_seed(0)
    train, test = TintedDigits(train=True, size=8), TintedDigits(train=False, size=8)
    split = ViewSplit(["ab", "L"]).fit(train.data)
    loader = DeviceLoader(DeviceDataset.from_dataset(train), 64, flip=False, drop_last=True, inputs=split)
    student = read_view(models.create("resnet8", num_classes=10), split.slices["ab"], split.channels)
    teacher = read_view(models.create("resnet8", num_classes=10), split.slices["L"], split.channels)
    losses = {"ce": {"weight": 1.0}, "crd": {"weight": 0.8, "num_negatives": 256, "feat_dim": 32}}
    distiller = Distiller(student, teacher, losses, sample=next(iter(loader))[0][:8], num_data=len(train))
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)
    before = distiller.criteria["crd"].memory_s.clone()
    for step, (images, target, index) in zip(range(2), loader):
        total, parts, _ = distiller(images, target, index)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        assert set(parts) == {"ce", "crd"} and torch.isfinite(total)
    assert not torch.equal(before, distiller.criteria["crd"].memory_s)  # the banks took the batches
    plain = DeviceLoader(DeviceDataset.from_dataset(train), 512, shuffle=False, augment=False, inputs=split)
    tests = DeviceLoader(DeviceDataset.from_dataset(test), 512, shuffle=False, augment=False, inputs=split)
    result = linear_probe(student, plain, tests, 10, epochs=20)
    assert result["dim"] == 64 and result["train"] == 1347 and result["test"] == 450


SHARED_TARBALL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                              "cifar10-jpg.tar.gz")


@pytest.mark.skipif(not os.path.isfile(SHARED_TARBALL), reason="../shared/data/cifar10-jpg.tar.gz is absent")
def test_the_cifar10_crossmodal_recipe_reads_the_shared_jpegs(tmp_path):
    """An extract of the shared CIFAR-10 JPEGs (20 train / 10 test images a class) through the recipe's loader."""
    limits, taken = {"train": 20, "test": 10}, {}
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(SHARED_TARBALL) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and taken.get((parts[0], parts[1]), 0) < limits.get(parts[0], 0):
                taken[parts[0], parts[1]] = taken.get((parts[0], parts[1]), 0) + 1
                tar.extract(member, tmp_path, **safe)
            if len(taken) == 20 and all(count == limits[split] for (split, _), count in taken.items()):
                break
    recipe = load_recipe("cifar10_crossmodal_ab", [f"data.root={tmp_path}", "epochs=1", f"output={tmp_path / 'run'}"])
    trainer = make_trainer(recipe, "cpu")
    images, *_ = next(iter(trainer.train_data))
    assert images.shape == (64, 2, 32, 32) and trainer.distiller.student.conv1.weight.shape[1] == 2
    assert trainer.evaluate()["top1"] >= 0
