"""The loss registry (fastkd/losses/_registry.py), driven by what is registered: every registered loss
builds from a probe of zoo models, takes its declared features in its objective and returns a finite
0-dim loss with a gradient; its recipe options and derived arguments agree with its constructor; and a
loss registered here, in the test, trains through a recipe and the Distiller with no edit to train/."""
import ast
import inspect
import math
import pathlib

import pytest
import torch
from torch import nn

import fastkd
from fastkd.losses import FEATURES, Features, MissingFeature, entry, register, registered, unregister, widths
from fastkd.models import MultiBranchResNet, create
from fastkd.train.distiller import Distiller
from fastkd.train.objectives import OBJECTIVES, build_objective, needs_teacher, objective_of
from fastkd.train.recipe import build

from test_engine import make

KEYS = list(registered())
BATCH, CLASSES, NUM_DATA = 4, 10, 64


def _images(n=BATCH, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _objective(key: str) -> nn.Module:
    """The objective a recipe of ``key`` alone builds: zoo resnet8x4 ← resnet32x4 (a tiny multi-branch
    ResNet for the online losses, the sequence models rowgru ← rowconv for losses of per-frame features);
    SSKD's second stage gets a first stage's head."""
    losses = {key: {"weight": 1.0}}
    torch.manual_seed(0)
    if objective_of(losses) == "online":
        student = MultiBranchResNet(8, widths=(4, 4, 8, 8), num_branches=4, num_classes=CLASSES)
        return build_objective(losses, student, None, None, NUM_DATA)
    sequences = any(name.startswith("frames_") for name in entry(key).takes)
    pair = ("rowgru", "rowconv") if sequences else ("resnet8x4", "resnet32x4")
    student, teacher = (create(name, num_classes=CLASSES) for name in pair)
    teacher_state = None
    if objective_of(losses) == "sskd_student":
        stage1 = build_objective({"rotation": {"weight": 1.0}}, create("resnet32x4", num_classes=CLASSES), teacher,
                                 _images(), NUM_DATA)
        teacher_state = {"losses": {f"rotation.{k}": v for k, v in stage1.criteria["rotation"].state_dict().items()}}
    return build_objective(losses, student, teacher, _images(), NUM_DATA, teacher_state)


@pytest.mark.parametrize("key", KEYS)
def test_every_registered_loss_trains_in_its_objective(key):
    loss_entry = entry(key)
    objective = _objective(key)
    assert type(objective) is OBJECTIVES[objective_of({key: {}})]
    assert set(loss_entry.takes) <= objective.OFFERS
    assert list(objective.criteria) == [key]
    objective.train()
    total, parts, logits = objective(_images(seed=1), torch.arange(BATCH) % CLASSES, torch.arange(BATCH), epoch=1.0)
    value = parts[key]
    assert value.dim() == 0 and torch.isfinite(value), value
    assert total.item() == pytest.approx(value.float().item(), rel=1e-6)
    assert logits.shape == (BATCH, CLASSES)
    value.backward()
    student_side = any(FEATURES[name].side == "student" for name in loss_entry.takes)
    trained = objective.student.parameters() if student_side else objective.criteria.parameters()
    grads = [p.grad for p in trained if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads), \
        f"no gradient reaches the {'student' if student_side else 'loss'} through {key}"
    if not loss_entry.needs_teacher:
        assert not needs_teacher({key: {}}) and getattr(objective, "teacher", None) is None


@pytest.mark.parametrize("key", KEYS)
def test_each_entry_agrees_with_its_class_and_the_recipe(key):
    loss_entry = entry(key)
    assert getattr(fastkd, loss_entry.cls.__name__) is loss_entry.cls  # every loss is exported from fastkd
    assert loss_entry.objective in OBJECTIVES
    assert set(loss_entry.takes) | set(loss_entry.init_takes) <= set(FEATURES)
    parameters = [name for name, p in inspect.signature(loss_entry.cls.__init__).parameters.items()
                  if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert loss_entry.options == [p for p in parameters if p not in loss_entry.derived]
    assert set(loss_entry.derived) <= set(parameters)
    for option in loss_entry.options:  # every option has a default: a recipe gives only what it changes
        loss_entry.default(option)
    recipe = build({"losses": {"ce": 1.0, key: {"weight": 1.0}}})
    assert recipe.losses[key] == {"weight": 1.0}
    for name in loss_entry.derived:  # filled in from the probe, never a recipe option
        with pytest.raises(ValueError, match=f"unknown key '{name}' in losses.{key}"):
            build({"losses": {key: {"weight": 1.0, name: 1}}})


def test_every_objective_offers_known_features():
    for name, objective in OBJECTIVES.items():
        assert objective.OBJECTIVE == name and objective.OFFERS <= set(FEATURES), name


def _constants(path: pathlib.Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_train_names_no_loss():
    """The trainer reads every loss through the registry: no registered key is spelled in fastkd/train."""
    train = pathlib.Path(fastkd.__file__).parent / "train"
    named = {path.name: sorted(_constants(path) & set(KEYS)) for path in sorted(train.glob("*.py"))}
    assert not any(named.values()), named


# --- a loss added by a user: registered here, trained through a recipe, then unregistered -----------------------

class MeanSquaredLogits(nn.Module):
    """scale · mean((z_s − z_t)²): a toy logit loss."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        return self.scale * (logits_s.float() - logits_t.float()).pow(2).mean()


class ProjectedPooled(nn.Module):
    """mean((W z_s − z_t)²) on the pooled features, W = Linear(s_dim, t_dim): a toy loss with derived sizes."""

    def __init__(self, s_dim: int, t_dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(s_dim, t_dim, bias=bias)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return (self.proj(f_s) - f_t).pow(2).mean()


@pytest.fixture
def toy_losses():
    register("msl", takes=("logits_s", "logits_t"))(MeanSquaredLogits)
    register("projected", takes=("pooled_s", "pooled_t"), build=widths(), derived=("s_dim", "t_dim"))(ProjectedPooled)
    try:
        yield
    finally:
        unregister("msl")
        unregister("projected")


def test_a_loss_registered_in_a_test_trains_through_a_recipe(toy_losses, tmp_path):
    losses = {"ce": {"weight": 1.0}, "msl": {"weight": 0.5, "scale": 2.0}, "projected": {"weight": 1.0}}
    with pytest.raises(ValueError, match=r"unknown key 'sclae' in losses.msl; valid: scale, weight"):
        build({"losses": {"msl": {"weight": 1.0, "sclae": 2.0}}})
    with pytest.raises(ValueError, match=r"unknown key 's_dim' in losses.projected; valid: bias, weight"):
        build({"losses": {"projected": {"weight": 1.0, "s_dim": 3}}})
    trainer = make(losses, tmp_path, epochs=1)  # test_engine's Tiny models: pooled widths 12 (student), 24
    distiller = trainer.distiller
    assert isinstance(distiller, Distiller) and distiller.criteria["msl"].scale == 2.0
    projector = distiller.criteria["projected"].proj
    assert (projector.in_features, projector.out_features) == (12, 24)
    with torch.no_grad():  # the term is the toy's formula on the features the registration names
        images, target = torch.randn(8, 3, 8, 8), torch.arange(8) % 5
        _, parts, _ = distiller(images, target)
        logit_s, logit_t = distiller.student(images), distiller.teacher(images)
        assert parts["msl"].item() == pytest.approx(2.0 * (logit_s - logit_t).pow(2).mean().item(), rel=1e-6)
    before = projector.weight.detach().clone()
    history = trainer.fit(log=None)
    assert math.isfinite(history[0]["train_msl"]) and math.isfinite(history[0]["train_projected"])
    assert history[0]["train_loss"] == pytest.approx(
        history[0]["train_ce"] + 0.5 * history[0]["train_msl"] + history[0]["train_projected"], rel=1e-4)
    assert not torch.equal(projector.weight, before)  # the toy's own parameters train with the student
    assert set(trainer.state_dict()["losses"]) == {"projected.proj.weight", "projected.proj.bias"}


def test_unregistered_and_duplicate_keys(toy_losses):
    with pytest.raises(ValueError, match="'msl' is already registered by MeanSquaredLogits"):
        register("msl", takes=("logits_s", "logits_t"))(MeanSquaredLogits)
    with pytest.raises(ValueError, match="takes 'logit_s', which is not a feature; features: logits_s"):
        register("other", takes=("logit_s",))
    with pytest.raises(ValueError, match=r"derived \['dim'\] are not parameters of MeanSquaredLogits"):
        register("other", takes=("logits_s",), derived=("dim",))(MeanSquaredLogits)
    with pytest.raises(ValueError, match="'ce' is the objectives' own cross entropy"):
        register("ce", takes=("logits_s",))
    assert "other" not in registered()
    unregister("msl")
    with pytest.raises(ValueError, match=r"unknown key 'msl' in losses; valid: .*kd"):
        build({"losses": {"msl": 1.0}})
    register("msl", takes=("logits_s", "logits_t"))(MeanSquaredLogits)  # the fixture unregisters it again


def test_a_feature_the_objective_lacks_is_named_with_the_loss(tmp_path):
    probe = Features("the offline Distiller", pooled_s=torch.zeros(2, 3), num_data=10)
    with pytest.raises(MissingFeature, match=r"the crd loss takes 'pooled_t' \(the teacher's pooled penultimate "
                                             r"feature features\[-1\]\), which the offline Distiller does not "
                                             r"provide here; it provides num_data, pooled_s"):
        entry("crd").create(probe, {})
    distiller = make({"ce": 1.0, "crd": {"weight": 1.0, "num_negatives": 4, "feat_dim": 4}}, tmp_path).distiller
    memory = distiller.criteria["crd"].memory_s.clone()
    with pytest.raises(MissingFeature, match=r"the crd loss takes 'index' \(the batch's dataset indices"):
        distiller(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))  # a batch without dataset indices
    assert torch.equal(distiller.criteria["crd"].memory_s, memory)


def test_losses_of_two_objectives_are_refused():
    with pytest.raises(ValueError, match=r"the losses name different objectives \(online_kd → online, "
                                         r"rotation → sskd_teacher\); a run trains one"):
        objective_of({"ce": {}, "online_kd": {}, "rotation": {}})
    with pytest.raises(ValueError, match=r"losses \['online_kd'\] do not apply to the offline Distiller \(online_kd "
                                         r"runs in the online objective: fastkd.train.objectives.build_objective "
                                         r"picks it\); valid: ce, "):
        Distiller(nn.Linear(2, 2), nn.Linear(2, 2), {"online_kd": {"weight": 1.0}}, torch.zeros(1, 2), 1)
