"""The engine: every engine-supported loss trains a few steps on CPU; resume continues exactly."""
import copy
import csv
import importlib.util
import json
import os

import pytest
import torch
from torch import nn

import fastkd

from fastkd.train.distiller import Distiller
from fastkd.train.engine import Trainer, accuracy, learning_rate
from fastkd.train.recipe import build


class Tiny(nn.Module):
    """A RepDistiller-convention CNN: features = [stem, stage 1, stage 2, pooled], then logits."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                    nn.ReLU())
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x, is_feat=False, preact=False):
        f0 = self.stem(x)
        f1 = self.stage1(f0)
        f2 = self.stage2(f1)
        pooled = f2.mean(dim=(2, 3))
        logits = self.fc(pooled)
        return ([f0, f1, f2, pooled], logits) if is_feat else logits

    def get_feat_modules(self):
        return nn.ModuleList([self.stem, self.stage1, self.stage2])


class Loader:
    """In-memory batches (images, labels, index); the order is a function of (seed, epoch)."""

    def __init__(self, images, labels, batch_size, shuffle=True, seed=0):
        self.images, self.labels, self.batch_size, self.shuffle, self.seed = images, labels, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.labels) // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.labels), generator=g) if self.shuffle else torch.arange(len(self.labels))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx], idx


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=g)
    labels = (images[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (images[:, 1].mean(dim=(1, 2)) > 0).long()
    return images, labels


def make(losses, tmp_path, epochs=2, seed=0, widths=(12, 6), device="cpu", **recipe):
    torch.manual_seed(seed)
    tree = {"losses": losses, "epochs": epochs, "optim": {"lr": 0.05}, "schedule": {"milestones": [1]},
            "output": str(tmp_path), **recipe}
    images, labels = data()
    teacher, student = Tiny(width=widths[0]), Tiny(width=widths[1])
    distiller = Distiller(student, teacher, build(tree).losses, images[:8], num_data=len(labels))
    train = Loader(images, labels, 16)
    test = Loader(images, labels, 32, shuffle=False)
    return Trainer(build(tree), distiller, train, test, device=device, output=str(tmp_path))


ENGINE_LOSSES = {
    "kd": {"weight": 0.9}, "dkd": {"weight": 1.0}, "hint": {"weight": 100.0}, "at": {"weight": 1000.0},
    "nst": {"weight": 50.0}, "vid": {"weight": 1.0}, "sp": {"weight": 3000.0}, "cc": {"weight": 0.02},
    "cckd": {"weight": 1.0}, "rkd": {"weight": 1.0}, "pkt": {"weight": 30000.0}, "srd": {"weight": 2.0},
    "crd": {"weight": 0.8, "num_negatives": 20, "feat_dim": 8},
}


@pytest.mark.parametrize("name", sorted(ENGINE_LOSSES))
def test_each_loss_trains_a_few_steps(name, tmp_path):
    trainer = make({"ce": {"weight": 1.0}, name: ENGINE_LOSSES[name]}, tmp_path, epochs=1)
    teacher_before = copy.deepcopy(trainer.distiller.teacher.state_dict())
    student_before = copy.deepcopy(trainer.distiller.student.state_dict())
    history = trainer.fit(log=None)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0][f"train_{name}"]))
    assert history[0]["train_loss"] == pytest.approx(
        history[0]["train_ce"] + ENGINE_LOSSES[name]["weight"] * history[0][f"train_{name}"], rel=1e-4)
    for key, value in trainer.distiller.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"teacher changed: {key}"
    assert any(not torch.equal(v, student_before[k]) for k, v in trainer.distiller.student.state_dict().items())
    assert not trainer.distiller.teacher.training
    if name in ("hint", "vid", "crd", "srd", "cc", "cckd"):  # the loss's own parameters are trained too
        assert len(list(trainer.distiller.criteria.parameters())) > 0
        owned = {id(p) for p in trainer.optimizer.param_groups[0]["params"]}
        assert all(id(p) in owned for p in trainer.distiller.criteria.parameters())


STAGED = {"ft": {"weight": 200.0}, "ab": {"weight": 0.0}, "fsp": {"weight": 0.0}}


def _changed(module, before):
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("name", sorted(STAGED))
def test_init_stage_trains_what_repdistiller_trains(name, tmp_path):
    widths = (8, 8) if name == "fsp" else (12, 6)  # FSP relates maps of equal channel counts
    trainer = make({"ce": {"weight": 1.0}, name: STAGED[name]}, tmp_path, epochs=1, init_epochs=2, widths=widths)
    d = trainer.distiller
    modules, loss_fn = trainer.init_stage
    images = data()[0][:16]
    with torch.no_grad():  # the stage's loss, derived here from the published formulas
        feat_s, _ = d.student(images, is_feat=True)
        feat_t, _ = d.teacher(images, is_feat=True)
        if name == "ft":
            expect = ((d.criteria["ft"]["paraphraser"](feat_t[-2])[1] - feat_t[-2]) ** 2).mean()
        elif name == "fsp":
            expect = fastkd.functional.fsp_loss(feat_s[:-1], feat_t[:-1])
        else:
            expect = fastkd.functional.ab_loss(d.criteria["ab"]["connector"](feat_s[1:-1]), feat_t[1:-1])
        assert loss_fn(images).item() == pytest.approx(expect.item(), rel=1e-5)
    student0 = copy.deepcopy(d.student.state_dict())
    criteria0 = copy.deepcopy(d.criteria.state_dict())
    trainer.run_init_stage(log=None)
    changed_s, changed_c = _changed(d.student, student0), _changed(d.criteria, criteria0)
    if name == "ft":  # only the paraphraser, as an autoencoder of the teacher map
        assert not changed_s and changed_c and all(k.startswith("ft.paraphraser.") for k in changed_c)
    else:  # the student's feature modules (and AB's connector); never its classifier
        assert changed_s and not any(k.startswith("fc.") for k in changed_s)
        assert all(k.startswith(("stem.", "stage1.", "stage2.")) for k in changed_s)
    assert trainer.init_done
    # the main stage: FT's paraphraser is frozen, its translator trained; AB / FSP at weight 0 are not computed
    criteria1 = copy.deepcopy(d.criteria.state_dict())
    history = trainer.fit(log=None)
    if name == "ft":
        assert history[0]["train_ft"] > 0
        changed = _changed(d.criteria, criteria1)
        assert changed and all(k.startswith("ft.translator.") for k in changed)
    else:
        assert f"train_{name}" not in history[0]
    assert trainer.fit(log=None) == history  # nothing left to run: the stage is not repeated


def test_init_stage_runs_before_the_first_epoch_and_survives_resume(tmp_path):
    losses = {"ce": {"weight": 1.0}, "ft": STAGED["ft"]}
    trainer = make(losses, tmp_path, epochs=1, init_epochs=1)
    lines = []
    trainer.fit(log=lines.append)
    assert lines[0].startswith("teacher resnet32x4: top-1 ")  # the teacher's accuracy, before anything trains
    assert lines[1].startswith("init_epoch=1/1 init_loss=") and lines[2].startswith("epoch=1")
    resumed = make(losses, tmp_path / "again", epochs=2, init_epochs=1)
    assert not resumed.init_done
    resumed.resume(os.path.join(tmp_path, "last.pt"))
    assert resumed.init_done and resumed.epoch == 1
    para = resumed.distiller.criteria["ft"]["paraphraser"].state_dict()
    assert all(torch.equal(v, trainer.distiller.criteria["ft"]["paraphraser"].state_dict()[k]) for k, v in para.items())


def test_init_stage_needs_the_students_feature_modules(tmp_path):
    class Bare(Tiny):
        get_feat_modules = None

    images, labels = data()
    recipe = build({"losses": {"ce": 1.0, "fsp": 0.0}, "output": str(tmp_path)})
    distiller = Distiller(Bare(width=8), Tiny(width=8), recipe.losses, images[:8], num_data=len(labels))
    with pytest.raises(ValueError, match="get_feat_modules"):
        Trainer(recipe, distiller, Loader(images, labels, 16), Loader(images, labels, 32))


def test_resume_continues_exactly(tmp_path):
    losses = {"ce": {"weight": 1.0}, "kd": {"weight": 1.0}, "crd": ENGINE_LOSSES["crd"]}
    straight = make(losses, tmp_path / "straight", epochs=3)
    straight.fit(log=None)
    first = make(losses, tmp_path / "cut", epochs=3)
    first.fit(epochs=2, log=None)
    resumed = make(losses, tmp_path / "other", epochs=3)  # the same teacher (a fixed checkpoint in real runs)
    with torch.no_grad():
        for p in resumed.distiller.student.parameters():
            p.normal_()  # whatever the student holds is replaced by the checkpoint's
    resumed.resume(os.path.join(tmp_path / "cut", "last.pt"))
    assert resumed.epoch == 2
    resumed.fit(log=None)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    for key, value in straight.distiller.student.state_dict().items():
        assert torch.equal(resumed.distiller.student.state_dict()[key], value), key
    crd_a, crd_b = straight.distiller.criteria["crd"], resumed.distiller.criteria["crd"]
    assert torch.equal(crd_a.memory_s, crd_b.memory_s) and torch.equal(crd_a.rng_state, crd_b.rng_state)
    lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    # the resumed run's CSV holds the whole run: the two epochs before the cut and the one after
    rows = list(csv.DictReader(open(tmp_path / "other" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) == pytest.approx(straight.history[-1]["train_loss"])
    assert {"train_kd", "train_crd", "test_top1", "images_per_s"} <= set(rows[0])


def test_learning_rate_schedules():
    multistep = build({"optim": {"lr": 0.05}, "schedule": {"milestones": [150, 180, 210]}, "epochs": 240})
    assert [learning_rate(multistep, e) for e in (0, 149.9, 150, 180, 239)] == pytest.approx(
        [0.05, 0.05, 0.005, 0.0005, 0.00005])
    cosine = build({"optim": {"lr": 0.1}, "schedule": {"name": "cosine", "warmup_epochs": 5}, "epochs": 105})
    assert learning_rate(cosine, 2.5) == pytest.approx(0.05)
    assert learning_rate(cosine, 5) == pytest.approx(0.1)
    assert learning_rate(cosine, 55) == pytest.approx(0.05)
    assert learning_rate(cosine, 105) == pytest.approx(0.0, abs=1e-12)


def test_accuracy_counts_top_k():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    top1, top2 = accuracy(logits, torch.tensor([1, 2, 1]), ks=(1, 2))
    assert int(top1) == 1 and int(top2) == 2


def test_student_alone_needs_no_teacher(tmp_path):
    images, labels = data()
    recipe = build({"losses": {"ce": 1.0}, "epochs": 8, "schedule": {"milestones": [10]}, "optim": {"lr": 0.1}})
    torch.manual_seed(0)
    trainer = Trainer(recipe, Distiller(Tiny(), None, recipe.losses, images[:4], len(labels)),
                      Loader(images, labels, 16), Loader(images, labels, 32, shuffle=False), output=str(tmp_path))
    before = trainer.evaluate()["top1"]
    history = trainer.fit(log=None)
    assert history[-1]["test_top1"] > before and history[-1]["test_top1"] > 60.0
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(Tiny(), None, {"ce": {"weight": 1.0}, "kd": {"weight": 1.0}}, images[:4], len(labels))


def test_metrics_csv_and_curves_png(tmp_path):
    from fastkd.train.metrics import MetricsLog

    log = MetricsLog(str(tmp_path))
    log.append({"epoch": 1, "train_loss": 2.0, "train_ce": 2.0, "test_top1": 40.0, "test_top5": 80.0})
    log.append({"epoch": 2, "train_loss": 1.0, "train_ce": 0.8, "train_kd": 0.2, "test_top1": 60.0, "test_top5": 90.0})
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["train_kd"] for r in rows] == ["", "0.2"]  # a column that appears later is added to the header
    path = log.plot()
    if importlib.util.find_spec("matplotlib") is None:  # an extra (fastkd[plots]): skipped silently without it
        assert path is None and not os.path.exists(tmp_path / "curves.png")
        return
    with open(path, "rb") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


def test_first_step_of_an_epoch_validates_values(tmp_path):
    trainer = make({"ce": {"weight": 1.0}, "kd": {"weight": 1.0}}, tmp_path, epochs=1)
    trainer.train_data.images = trainer.train_data.images.clone()
    trainer.train_data.images[:] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        trainer.train_epoch(0)


class Plain(nn.Module):
    """A model without RepDistiller's is_feat: the engine reads its features through taps."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.pool(self.body(x)).flatten(1))


def test_models_without_is_feat_are_read_through_taps(tmp_path):
    images, labels = data()
    recipe = build({"losses": {"ce": 1.0, "sp": 3000.0, "crd": {"weight": 0.8, "num_negatives": 10, "feat_dim": 4}},
                    "epochs": 1, "schedule": {"milestones": [5]}})
    taps = ["body.0", "body.2", "body.3", "head:input"]  # stem, a stage, the last map, the pooled feature
    torch.manual_seed(0)
    distiller = Distiller(Plain(4), Plain(6), recipe.losses, images[:4], len(labels), student_taps=taps,
                          teacher_taps=taps)
    assert distiller.criteria["crd"].embed_s.in_features == 4 and distiller.criteria["crd"].embed_t.in_features == 6
    total, parts, logits = distiller(images[:8], labels[:8], torch.arange(8))
    assert set(parts) == {"ce", "sp", "crd"} and logits.shape == (8, 5) and torch.isfinite(total)
    total.backward()
    assert distiller.student.head.weight.grad is not None
    assert list(distiller.student.state_dict()) == list(Plain(4).state_dict())  # no wrapper in the keys
    with pytest.raises(TypeError, match="no default taps for Plain"):
        Distiller(Plain(4), Plain(6), recipe.losses, images[:4], len(labels))
