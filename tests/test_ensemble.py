"""Ensemble distillation (issue 18): the multi-bank CRD op, EnsembleCRDLoss, TeacherEnsemble's averaged
prediction, the Distiller with M teachers, recipes with ``teachers``, the teachers' evaluation, exact resume."""
from __future__ import annotations

import copy
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import models
from fastkd.losses import CRDLoss, EnsembleCRDLoss, KDLoss
from fastkd.models import TeacherEnsemble
from fastkd.models.ensemble import combine
from fastkd.ops import crd as crd_ops
from fastkd.train.distiller import Distiller
from fastkd.train.engine import Trainer
from fastkd.train.recipe import build, load_recipe

from _tolerances import TOL, rel
from test_crd import make_step, np_embed, np_side
from test_engine import Loader, Tiny, data


def unit(*shape, seed, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
                       dim=-1).to(dtype)


def pairs(m=3, b=5, n=40, d=16, seed=0, dtype=torch.float64):
    """M pairs' anchors [M, B, D] and banks [N, M, D], dataset indices, unknown log Z's."""
    idx = torch.randint(0, n, (b,), generator=torch.Generator().manual_seed(seed))
    log_z = torch.full((m,), float("-inf"), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return (unit(m, b, d, seed=seed + 1, dtype=dtype), unit(m, b, d, seed=seed + 2, dtype=dtype),
            unit(n, m, d, seed=seed + 3, dtype=dtype), unit(n, m, d, seed=seed + 4, dtype=dtype), idx, log_z)


# ---------------------------------------------------------------- the op

@pytest.mark.parametrize("contrast", ["philox", "table", "shared"])
def test_multi_op_reference_is_each_pair_alone(contrast):
    v_s, v_t, m_s, m_t, idx, log_z = pairs()
    rng = torch.tensor([7, 3])
    table = None
    if contrast == "table":
        table = torch.randint(0, 40, (5, 10), generator=torch.Generator().manual_seed(9))
        table[:, 0] = idx
    out = crd_ops.nce_multi_with_grad_reference(v_s, v_t, m_s, m_t, idx, table, log_z, log_z.clone(), rng, 9, 0.07,
                                                0.0, contrast == "shared")
    for m in range(3):
        one = crd_ops.nce_with_grad_reference(v_s[m], v_t[m], m_s[:, m], m_t[:, m], idx, table, log_z[m], log_z[m].clone(),
                                              rng, 9, 0.07, 0.0, contrast == "shared")
        for got, want in zip(out, one):
            assert torch.equal(got[m], want)


def test_multi_op_matches_a_float64_derivation():
    """Each pair's loss and first-step Z against the explicit-loop NCE of tests/test_crd.py."""
    v_s, v_t, m_s, m_t, idx, log_z = pairs(m=2, b=4, n=30, d=6)
    cidx = torch.randint(0, 30, (4, 8), generator=torch.Generator().manual_seed(5))
    cidx[:, 0] = idx
    loss, z_s, z_t, _, _ = crd_ops.CRD_NCE_MULTI(v_s, v_t, m_s, m_t, idx, cidx, log_z, log_z.clone(),
                                                 torch.tensor([0, 0]), 7, 0.1, 0.0, False)
    for m in range(2):
        side_s, zs = np_side(v_s[m].numpy(), m_t[:, m].numpy(), cidx.numpy(), None, 0.1, 30)
        side_t, zt = np_side(v_t[m].numpy(), m_s[:, m].numpy(), cidx.numpy(), None, 0.1, 30)
        assert loss[m].item() == pytest.approx(side_s + side_t, rel=1e-12)
        assert z_s[m].item() == pytest.approx(math.log(zs), rel=1e-12)
        assert z_t[m].item() == pytest.approx(math.log(zt), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("z_momentum", [0.0, 0.5])
def test_native_multi_op_matches_its_reference(dtype, z_momentum):
    v_s, v_t, m_s, m_t, idx, log_z = pairs(m=4, b=6, n=64, d=16, dtype=dtype)
    rng = torch.tensor([3, 1])
    args = (idx, None, log_z, log_z.clone(), rng, 11, 0.07, z_momentum, False)
    first = crd_ops.nce_multi_with_grad_reference(v_s, v_t, m_s, m_t, *args)
    known = (idx, None, first[1], first[2], rng, 11, 0.07, z_momentum, False)  # the steps after the first
    for step in (args, known):
        want = crd_ops.nce_multi_with_grad_reference(v_s.double(), v_t.double(), m_s, m_t, *step)
        got = crd_ops.CRD_NCE_MULTI(v_s, v_t, m_s, m_t, *step)
        for g, w in zip(got, want):
            # the gradients come back in the anchors' dtype, the rest in the accumulation dtype
            assert rel(g, w) <= 4 * TOL[torch.promote_types(g.dtype, torch.float32) if g.dtype != dtype else dtype]


def test_multi_op_gradients_by_autograd_and_gradcheck():
    v_s, v_t, m_s, m_t, idx, log_z = pairs(m=2, b=3, n=20, d=5)
    v_s.requires_grad_(True)
    v_t.requires_grad_(True)
    rng = torch.tensor([1, 2])

    def terms(a, b):
        return crd_ops.CRD_NCE_MULTI(a, b, m_s, m_t, idx, None, log_z, log_z.clone(), rng, 6, 0.5, 0.0, False)[0]

    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    (terms(v_s, v_t) * weights).sum().backward()
    expected_s, expected_t = torch.autograd.grad(
        (crd_ops.nce_multi_with_grad_reference(v_s, v_t, m_s, m_t, idx, None, log_z, log_z.clone(), rng, 6, 0.5, 0.0,
                                               False)[0] * weights).sum(), (v_s, v_t))
    # the reference's gradient by autograd through the published computation, one pair at a time
    for m in range(2):
        a = v_s[m].detach().clone().requires_grad_(True)
        cidx = crd_ops.philox.contrast_indices(idx, rng, 6, 20, False)
        loss, _, _ = crd_ops.nce_reference(a, v_t[m].detach(), m_s[:, m], m_t[:, m], cidx, log_z[m], log_z[m].clone(), 0.5, 20)
        (loss * weights[m]).backward()
        assert rel(v_s.grad[m], a.grad) <= 1e-10
    assert rel(v_s.grad, expected_s) <= 1e-10 and rel(v_t.grad, expected_t) <= 1e-10
    # with Z known (every step after the first: the estimate is not differentiated)
    known = torch.tensor([2.5, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: crd_ops.CRD_NCE_MULTI(a, b, m_s, m_t, idx, None, known, known.flip(0), rng, 6, 0.5, 0.0, False)[0],
        (v_s.detach().requires_grad_(True), v_t.detach().requires_grad_(True)))


def test_multi_op_refuses_bad_shapes():
    v_s, v_t, m_s, m_t, idx, log_z = pairs(m=2)
    rng = torch.tensor([0, 0])
    with pytest.raises((ValueError, RuntimeError), match=r"\[N, M, D\]"):
        crd_ops.CRD_NCE_MULTI(v_s, v_t, m_s[:, :1], m_t[:, :1], idx, None, log_z, log_z, rng, 5, 0.1, 0.0, False)
    with pytest.raises((ValueError, RuntimeError), match=r"\[M\]"):
        crd_ops.CRD_NCE_MULTI(v_s, v_t, m_s, m_t, idx, None, log_z[:1], log_z[:1], rng, 5, 0.1, 0.0, False)
    with pytest.raises((ValueError, RuntimeError), match="B >= 1"):
        crd_ops.CRD_NCE_MULTI(v_s[:, :0], v_t[:, :0], m_s, m_t, idx[:0], None, log_z, log_z, rng, 5, 0.1, 0.0, False)


def test_every_backend_gives_the_pairs_alone():
    """torch (the published computation per pair) and native (one pass) agree, pair by pair, with single CRD."""
    v_s, v_t, m_s, m_t, idx, log_z = pairs(m=3, dtype=torch.float32)
    results = {}
    for backend in fastkd.backends():
        if backend == "triton":
            continue
        with fastkd.use_backend(backend):
            results[backend] = crd_ops.nce_multi(v_s, v_t, m_s, m_t, idx, None, log_z, log_z.clone(),
                                                 torch.tensor([5, 0]), 9, 0.07)
            single = [crd_ops.nce(v_s[m], v_t[m], m_s[:, m], m_t[:, m], idx, None, log_z[m], log_z[m].clone(),
                                  torch.tensor([5, 0]), 9, 0.07) for m in range(3)]
        for m in range(3):
            assert rel(results[backend][0][m], single[m][0]) <= TOL[torch.float32]
    first, *others = results.values()
    for other in others:
        for a, b in zip(first, other):
            assert rel(a, b) <= 4 * TOL[torch.float32]


# ---------------------------------------------------------------- EnsembleCRDLoss

def test_one_teacher_is_crd_itself():
    """Same seed → same parameters and banks; the same steps give the same losses and banks."""
    torch.manual_seed(3)
    single = CRDLoss(9, 11, num_data=40, feat_dim=6, num_negatives=7, seed=5)
    torch.manual_seed(3)
    ensemble = EnsembleCRDLoss(9, [11], num_data=40, feat_dim=6, num_negatives=7, seed=5)
    assert torch.equal(single.embed_s.weight, ensemble.embed_s[0].weight)
    assert torch.equal(single.embed_t.weight, ensemble.embed_t[0].weight)
    assert torch.equal(single.memory_s, ensemble.memory_s[:, 0]) and torch.equal(single.memory_t, ensemble.memory_t[:, 0])
    for seed in range(3):
        f_s, f_t, idx, _ = make_step(seed=seed)
        a, b = single(f_s.float(), f_t.float(), idx), ensemble(f_s.float(), [f_t.float()], idx)
        assert rel(b, a) <= TOL[torch.float32]
    assert torch.allclose(single.memory_s, ensemble.memory_s[:, 0], atol=1e-6)
    assert torch.allclose(single.log_z_s, ensemble.log_z_s[0]) and torch.equal(single.rng_state, ensemble.rng_state)


def test_identical_teachers_give_m_times_the_single_teacher_loss():
    torch.manual_seed(0)
    single = CRDLoss(9, 11, num_data=40, feat_dim=6, num_negatives=7, seed=2).double()
    ensemble = EnsembleCRDLoss(9, [11, 11, 11], num_data=40, feat_dim=6, num_negatives=7, seed=2).double()
    with torch.no_grad():
        for m in range(3):
            ensemble.embed_s[m].load_state_dict(single.embed_s.state_dict())
            ensemble.embed_t[m].load_state_dict(single.embed_t.state_dict())
            ensemble.memory_s[:, m].copy_(single.memory_s)
            ensemble.memory_t[:, m].copy_(single.memory_t)
    for seed in range(3):
        f_s, f_t, idx, _ = make_step(seed=seed)
        want = single(f_s, f_t, idx)
        got = ensemble(f_s, [f_t, f_t, f_t], idx)
        assert rel(ensemble.last_terms, want.expand(3)) <= 1e-12
        assert rel(got, 3 * want) <= 1e-12
    for m in range(3):
        assert torch.allclose(ensemble.memory_t[:, m], single.memory_t, atol=1e-14)


def test_ensemble_crd_matches_the_float64_derivation_of_each_teacher():
    torch.manual_seed(1)
    loss = EnsembleCRDLoss(9, [11, 4], num_data=40, feat_dim=6, num_negatives=7, temperature=0.1).double()
    f_s, f_t, idx, cidx = make_step()
    f_t2 = torch.randn(5, 4, dtype=torch.float64)
    banks_s, banks_t = loss.memory_s.clone().numpy(), loss.memory_t.clone().numpy()
    got = loss(f_s, [f_t, f_t2], idx, cidx)
    total = 0.0
    for m, feature in enumerate((f_t, f_t2)):
        v_s, v_t = np_embed(f_s, loss.embed_s[m]), np_embed(feature, loss.embed_t[m])
        total += np_side(v_s, banks_t[:, m], cidx.numpy(), None, 0.1, 40)[0]
        total += np_side(v_t, banks_s[:, m], cidx.numpy(), None, 0.1, 40)[0]
    assert got.item() == pytest.approx(total, rel=1e-10)


def test_ensemble_crd_state_round_trip_and_refusals():
    torch.manual_seed(0)
    loss = EnsembleCRDLoss(9, [11, 11], num_data=40, feat_dim=6, num_negatives=7)
    f_s, f_t, idx, _ = make_step()
    loss(f_s.float(), [f_t.float(), f_t.float()], idx)
    state = copy.deepcopy(loss.state_dict())
    assert state["memory_s"].shape == (40, 2, 6) and state["log_z_t"].shape == (2,)
    again = EnsembleCRDLoss(9, [11, 11], num_data=40, feat_dim=6, num_negatives=7)
    again.load_state_dict(state)
    f_s, f_t, idx, _ = make_step(seed=4)
    assert torch.equal(loss(f_s.float(), [f_t.float()] * 2, idx), again(f_s.float(), [f_t.float()] * 2, idx))
    assert loss.half().log_z_s.dtype == torch.float32  # log Z never below fp32
    bad = dict(state, log_z_s=torch.tensor([float("nan"), 0.0]))
    with pytest.raises(ValueError, match="log_z_s"):
        again.load_state_dict(bad)
    with pytest.raises(ValueError, match="2 teachers' features"):
        again(f_s.float(), [f_t.float()], idx)
    with pytest.raises(ValueError, match=r"t_dims\[1\]"):
        again(f_s.float(), [f_t.float(), f_t[:, :3].float()], idx)
    with pytest.raises(ValueError, match="shard_banks"):
        EnsembleCRDLoss(9, [11], num_data=40, shard_banks=True)
    with pytest.raises(ValueError, match="t_dims"):
        EnsembleCRDLoss(9, [], num_data=40)


# ---------------------------------------------------------------- the averaged prediction

def test_combine_is_the_averaged_prediction():
    g = torch.Generator().manual_seed(0)
    logits = [3 * torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    probs = np.mean([torch.softmax(z, 1).numpy() for z in logits], axis=0)
    assert torch.allclose(torch.softmax(combine(logits), 1), torch.from_numpy(probs), atol=1e-14)
    assert torch.allclose(combine(logits, "logits"), sum(logits) / 3, atol=1e-14)
    half = [z.to(torch.bfloat16) for z in logits]  # under AMP: the members' dtype, as one teacher's logits
    assert combine(half).dtype == torch.bfloat16 and combine(half, "logits").dtype == torch.bfloat16
    assert torch.allclose(combine(half).double(), combine([z.double() for z in half]), atol=0.05)
    with pytest.raises(ValueError, match="differ in shape"):
        combine([logits[0], logits[1][:, :5]])
    with pytest.raises(ValueError, match="average"):
        combine(logits, "median")


@pytest.mark.parametrize("average", ["probs", "logits"])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_identical_teachers_teach_kd_as_one(average, m):
    g = torch.Generator().manual_seed(1)
    s, t = 2 * torch.randn(8, 10, generator=g), 2 * torch.randn(8, 10, generator=g)
    kd = KDLoss(temperature=4.0)
    one = kd(s, t)
    many = kd(s, combine([t] * m, average))
    if average == "logits" and m in (2, 4):
        assert torch.equal(many, one)  # a mean of powers-of-two copies is exact
    else:
        assert rel(many, one) <= 4 * TOL[torch.float32]


# ---------------------------------------------------------------- the Distiller with M teachers

def _ensemble(m=3, widths=(12, 12, 12), seed=0):
    torch.manual_seed(seed)
    return TeacherEnsemble([Tiny(width=w) for w in widths[:m]])


def test_distiller_serves_each_loss_by_what_it_reads():
    images, labels = data()
    ens = _ensemble(widths=(12, 8, 16))
    losses = {"ce": 1.0, "kd": 0.9, "crd": {"weight": 0.8, "num_negatives": 20, "feat_dim": 8}, "at": 1000.0,
              "hint": 100.0}
    d = Distiller(Tiny(width=6), ens, losses, images[:8], num_data=len(labels))
    assert d._forms == {"kd": "combined", "crd": "stacked", "at": "each", "hint": "each"}
    assert isinstance(d.criteria["crd"], EnsembleCRDLoss) and d.criteria["crd"].num_teachers == 3
    assert len(d.criteria["hint"]) == 3  # a regressor per teacher: widths 12, 8, 16
    total, parts, _ = d(images[:16], labels[:16], index=torch.arange(16))
    total.backward()
    assert set(parts) == {"ce", "kd", "crd", "at", "hint"}
    assert all(p.grad is not None for p in d.criteria["hint"][1].parameters())


def test_identical_teachers_give_the_single_teacher_terms():
    """KD from M copies equals KD from one; a per-teacher loss (AT) is M times the single one."""
    images, labels = data()
    torch.manual_seed(0)
    teacher, student = Tiny(width=12), Tiny(width=6)
    losses = {"ce": 1.0, "kd": {"weight": 0.9, "temperature": 4.0}, "at": 1000.0}
    one = Distiller(copy.deepcopy(student), copy.deepcopy(teacher), losses, images[:8])
    many = Distiller(copy.deepcopy(student), TeacherEnsemble([copy.deepcopy(teacher) for _ in range(4)], "logits"),
                     losses, images[:8])
    _, single_parts, _ = one(images[:16], labels[:16])
    _, parts, _ = many(images[:16], labels[:16])
    assert torch.equal(parts["kd"], single_parts["kd"])
    assert rel(parts["at"], 4 * single_parts["at"]) <= 4 * TOL[torch.float32]


def test_distiller_refuses_what_does_not_take_an_ensemble():
    images, _ = data()
    with pytest.raises(ValueError, match="initialisation stage"):
        Distiller(Tiny(width=6), _ensemble(), {"ce": 1.0, "ft": 200.0}, images[:8])
    with pytest.raises(ValueError, match="TeacherEnsemble"):
        Distiller(Tiny(width=6), _ensemble(), {"ce": 1.0, "kd": 0.9}, images[:8], teacher_taps=["stem"])


def _trainer(path, epochs=3, seed=0):
    torch.manual_seed(seed)
    images, labels = data()
    losses = {"ce": {"weight": 1.0}, "kd": {"weight": 1.0}, "at": {"weight": 1000.0},
              "crd": {"weight": 0.8, "num_negatives": 20, "feat_dim": 8}}
    tree = {"losses": losses, "epochs": epochs, "optim": {"lr": 0.05}, "schedule": {"milestones": [1]},
            "output": str(path)}
    ens = _ensemble(widths=(12, 8, 16), seed=7)  # the same teachers in every trainer (fixed checkpoints in real runs)
    distiller = Distiller(Tiny(width=6), ens, build(tree).losses, images[:8], num_data=len(labels))
    return Trainer(build(tree), distiller, Loader(images, labels, 16), Loader(images, labels, 32, shuffle=False),
                   device="cpu", output=str(path))


def test_ensemble_run_resumes_exactly_with_every_bank(tmp_path):
    straight = _trainer(tmp_path / "straight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # untrained teachers are near chance
        straight.fit(log=None)
        cut = _trainer(tmp_path / "cut")
        cut.fit(epochs=2, log=None)
        saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
        assert saved["losses"]["crd.memory_s"].shape == (96, 3, 8)  # every teacher's bank
        assert saved["losses"]["crd.memory_t"].shape == (96, 3, 8)
        resumed = _trainer(tmp_path / "other", seed=1)
        resumed.resume(str(tmp_path / "cut" / "last.pt"))
        resumed.fit(log=None)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    for key, value in straight.distiller.student.state_dict().items():
        assert torch.equal(resumed.distiller.student.state_dict()[key], value), key
    a, b = straight.distiller.criteria["crd"], resumed.distiller.criteria["crd"]
    assert torch.equal(a.memory_s, b.memory_s) and torch.equal(a.memory_t, b.memory_t)
    assert torch.equal(a.log_z_s, b.log_z_s) and torch.equal(a.rng_state, b.rng_state)


def test_teachers_are_evaluated_alone_and_as_an_ensemble(tmp_path):
    trainer = _trainer(tmp_path, epochs=1)
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        scores = trainer.evaluate_teacher(log=lines.append)
    ens = trainer.distiller.teacher
    assert [m["top1"] for m in scores["members"]] == [trainer.evaluate(model=m)["top1"] for m in ens.members]
    assert scores["top1"] == trainer.evaluate(model=ens)["top1"]
    assert len(lines) == 4 and lines[-1].startswith("the ensemble of 3 (probs averaged)")


# ---------------------------------------------------------------- recipes and the CLI

def test_recipe_teachers_parse_and_refuse():
    recipe = load_recipe("digits_ensemble_kd", ["teachers.1.checkpoint=b.pt", "teachers.2.weights=c.safetensors"])
    assert recipe.teacher is None and [t.name for t in recipe.teachers] == ["resnet20"] * 3
    assert recipe.teachers[1].checkpoint == "b.pt" and recipe.teachers[2].weights == "c.safetensors"
    with pytest.raises(ValueError, match="teacher.checkpoint names a single teacher"):
        load_recipe("digits_ensemble_kd", ["teacher={name: resnet20, checkpoint: a.pt}"])
    with pytest.raises(ValueError, match=r"teachers\[0\].cache"):
        load_recipe("digits_ensemble_kd", ["teachers.0.cache=somewhere"])
    with pytest.raises(ValueError, match="non-empty list"):
        load_recipe("digits_ensemble_kd", ["teachers=[]"])
    with pytest.raises(ValueError, match="not a position"):
        load_recipe("digits_ensemble_kd", ["teachers.3.checkpoint=d.pt"])
    with pytest.raises(ValueError, match=r"teachers\[1\].checkpoint and teachers\[1\].weights"):
        load_recipe("digits_ensemble_kd", ["teachers.1.checkpoint=b.pt", "teachers.1.weights=b.pt"])
    with pytest.raises(ValueError, match="ensemble_average"):
        load_recipe("digits_ensemble_kd", ["ensemble_average=median"])


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """Three digits teachers (resnet8, untrained, different seeds) as RepDistiller {'model': ...} files."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        path = str(folder / f"t{seed}.pth")
        torch.save({"model": models.create("resnet8", num_classes=10).state_dict()}, path)
        paths.append(path)
    return paths


def _given(paths, name="resnet8"):
    return [f"teachers.{i}.{key}={value}" for i, path in enumerate(paths)
            for key, value in (("name", name), ("checkpoint", path))]


@pytest.mark.parametrize("recipe", ["digits_ensemble_kd", "digits_ensemble_crd"])
def test_ensemble_recipes_run_an_epoch_through_the_cli(recipe, teacher_files, tmp_path, capsys):
    from fastkd.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        code = main(["distill", recipe, "epochs=1", "data.image_size=16", *_given(teacher_files),
                     "--output", str(tmp_path / "run")])
    assert code == 0
    out = capsys.readouterr().out
    assert "an ensemble of 3 teachers" in out and "the ensemble of 3 (probs averaged)" in out
    assert out.count("teachers[") >= 3
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert len(state["teacher_eval"]["members"]) == 3
    if recipe.endswith("crd"):
        assert state["losses"]["crd.memory_s"].shape[:2] == (1347, 3)


def test_ensemble_runs_refuse_what_they_cannot_do(teacher_files):
    from fastkd.train.cache_teacher import cache_teacher
    from fastkd.train.run import make_trainer

    missing = load_recipe("digits_ensemble_kd", ["epochs=1", "teachers.1.checkpoint=" + teacher_files[1]])
    with pytest.raises(ValueError, match=r"teachers\[0\], teachers\[2\]: each teacher of an ensemble needs"):
        make_trainer(missing, device="cpu")
    sskd = load_recipe("digits_ensemble_kd", ["losses={ce: 1.0, sskd: 1.0}", *_given(teacher_files)])
    with pytest.raises(ValueError, match="offline distiller"):
        make_trainer(sskd, device="cpu")
    with pytest.raises(ValueError, match="caches one teacher"):
        cache_teacher(load_recipe("digits_ensemble_kd", _given(teacher_files)), epochs=1, output="unused")


def test_run_folders_name_the_ensemble_and_hash_its_files(teacher_files):
    from fastkd.train.rundir import default_folder, describe

    recipe = load_recipe("digits_ensemble_kd", _given(teacher_files))
    folder = default_folder("digits_ensemble_kd", recipe)
    assert os.path.basename(folder).startswith("resnet8-from-resnet8+resnet8+resnet8-")
    description = describe(recipe)
    assert {f"weights[teachers[{i}].checkpoint]" for i in range(3)} <= set(description)
    other = load_recipe("digits_ensemble_kd", _given(teacher_files[::-1]))
    assert default_folder("digits_ensemble_kd", other) != folder


def test_bank_update_of_the_interleaved_banks_is_each_bank_updated_alone():
    bank = unit(30, 3, 8, seed=11)
    index = torch.tensor([4, 29, 4, 0, 17])  # a repeated index: its last occurrence wins in each bank
    value = unit(3, 5, 8, seed=12)
    want = bank.clone()
    for m in range(3):
        one = bank[:, m].contiguous()
        crd_ops.bank_update_reference(one, index, value[m], 0.5)
        want[:, m] = one
    for backend in [b for b in fastkd.backends() if b != "triton"]:
        got = bank.clone()
        with fastkd.use_backend(backend):
            crd_ops.bank_update_multi_(got, index, value, 0.5)
        assert torch.allclose(got, want, atol=1e-14), backend


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ensemble_crd_on_cuda_matches_the_cpu_step():
    """On CUDA each pair runs the single-pair fused kernel (Triton, or CUDA C++ on a contiguous copy of its bank):
    the loss and the banks after two steps equal the CPU's."""
    torch.manual_seed(0)
    cpu = EnsembleCRDLoss(9, [11, 7, 11], num_data=40, feat_dim=16, num_negatives=7, seed=3)
    gpu = copy.deepcopy(cpu).cuda()
    for seed in range(2):
        f_s, f_t, idx, _ = make_step(seed=seed)
        f_t2 = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        feats = [f_s.float(), [f_t.float(), f_t2.float(), f_t.float()], idx]
        want = cpu(*feats)
        got = gpu(feats[0].cuda(), [f.cuda() for f in feats[1]], idx.cuda())
        assert rel(got, want) <= 4 * TOL[torch.float32]
    assert torch.allclose(gpu.memory_s.cpu(), cpu.memory_s, atol=1e-5)
    assert torch.allclose(gpu.log_z_t.cpu(), cpu.log_z_t, rtol=1e-5)
