"""Online distillation (ONE, OKDDip, multi-branch diversity enhancement): the losses against float64
derivations written out here (numpy, explicit loops), gradient checks, and the multi-branch model."""
import math

import numpy as np
import pytest
import torch

import fastkd
from fastkd import functional as fk
from fastkd.models import MultiBranchResNet, create

from _helpers import arr, close, rand  # noqa: E402


def log_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def kl_rows(z_t, z_s, temperature):
    """T² · (1/B) Σ_b KL(softmax(z_t/T) ‖ softmax(z_s/T)), numpy float64."""
    lp_t, lp_s = log_softmax(z_t / temperature), log_softmax(z_s / temperature)
    return temperature**2 * float((np.exp(lp_t) * (lp_t - lp_s)).sum(axis=1).mean())


@pytest.mark.parametrize("m,batch,classes,temperature", [(2, 1, 3, 3.0), (3, 5, 7, 3.0), (4, 9, 10, 1.5)])
def test_online_kd_against_derivation(m, batch, classes, temperature):
    z, z_e = 3 * rand(m, batch, classes), 3 * rand(batch, classes, seed=1)
    expected = sum(kl_rows(arr(z_e), arr(z[i]), temperature) for i in range(m))
    close(fk.online_kd_loss(z, z_e, temperature), expected)
    close(fastkd.OnlineKDLoss(temperature)(z, z_e), expected)


def test_online_kd_detaches_the_ensemble_by_default():
    z, z_e = rand(3, 4, 5).requires_grad_(), rand(4, 5, seed=1).requires_grad_()
    fastkd.OnlineKDLoss()(z, z_e).backward()
    assert z_e.grad is None and z.grad.abs().sum() > 0
    fastkd.OnlineKDLoss(detach_teacher=False)(z, z_e).backward()
    assert z_e.grad.abs().sum() > 0


def test_branch_cross_entropy_against_derivation():
    z, z_e = 2 * rand(3, 6, 4), 2 * rand(6, 4, seed=2)
    y = torch.tensor([0, 3, 1, 1, 2, 0])
    ce = lambda logits: float(-log_softmax(arr(logits))[np.arange(6), y.numpy()].mean())  # noqa: E731
    close(fk.branch_cross_entropy(z, y), sum(ce(z[i]) for i in range(3)))
    close(fk.branch_cross_entropy(z, y, z_e), sum(ce(z[i]) for i in range(3)) + ce(z_e))


def classifier_diversity_numpy(weights):
    total = 0.0
    for i in range(len(weights)):
        for j in range(i + 1, len(weights)):
            w_i, w_j = arr(weights[i]), arr(weights[j])
            k, d = w_i.shape
            entries = [sum(w_i[c, a] * w_j[c, b] for c in range(k)) for a in range(d) for b in range(d)]
            total += math.sqrt(sum(e * e for e in entries))
    return total


@pytest.mark.parametrize("m,classes,dim", [(2, 3, 4), (3, 5, 2), (4, 2, 6)])
def test_classifier_diversity_against_derivation(m, classes, dim):
    weights = [rand(classes, dim, seed=i) for i in range(m)]
    close(fk.classifier_diversity_loss(weights), classifier_diversity_numpy(weights))
    close(fastkd.ClassifierDiversityLoss()(weights), classifier_diversity_numpy(weights))


def test_classifier_diversity_gradient_is_nonzero_and_correct():
    weights = [rand(5, 4, seed=i).requires_grad_() for i in range(3)]
    assert torch.autograd.gradcheck(lambda *w: fk.classifier_diversity_loss(list(w)), tuple(weights))
    fk.classifier_diversity_loss(weights).backward()
    for w in weights:
        assert w.grad is not None and float(w.grad.abs().sum()) > 1e-3
    # d/dW_1 of ‖W_1ᵀW_2‖_F for two branches: W_2 (W_2ᵀW_1) / ‖W_1ᵀW_2‖_F
    w1, w2 = rand(3, 2, seed=7).requires_grad_(), rand(3, 2, seed=8)
    fk.classifier_diversity_loss([w1, w2]).backward()
    m = arr(w1).T @ arr(w2)
    assert np.allclose(arr(w1.grad), arr(w2) @ m.T / np.linalg.norm(m), rtol=1e-10)


def test_classifier_diversity_reaches_the_model_classifiers():
    model = create("resnet8_mb3", num_classes=10)
    loss = fastkd.ClassifierDiversityLoss()(model.classifiers())
    loss.backward()
    for fc in model.classifiers():
        assert float(fc.weight.grad.abs().sum()) > 0


def test_peer_attention_and_okddip_against_derivation():
    p, batch, classes, d, temperature = 3, 4, 5, 2, 3.0
    q, k = rand(p, batch, d), rand(p, batch, d, seed=1)
    z, z_l = 3 * rand(p, batch, classes, seed=2), 3 * rand(batch, classes, seed=3)
    a = np.zeros((batch, p, p))
    for b in range(batch):
        for i in range(p):
            e = np.array([arr(q[i, b]) @ arr(k[j, b]) for j in range(p)])
            a[b, i] = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
    attention = fk.peer_attention(q, k)
    assert np.allclose(arr(attention), a, rtol=1e-12)
    expected = 0.0
    for i in range(p):
        target = np.stack([sum(a[b, i, j] * arr(z[j, b]) for j in range(p)) for b in range(batch)])
        expected += kl_rows(target, arr(z[i]), temperature)
    expected += kl_rows(arr(z).mean(axis=0), arr(z_l), temperature)
    close(fk.okddip_loss(z, z_l, attention, temperature), expected)


def test_okddip_gradcheck_and_module():
    z, z_l = rand(3, 4, 5).requires_grad_(), rand(4, 5, seed=1).requires_grad_()
    a = rand(4, 3, 3, seed=2).softmax(dim=2).requires_grad_()
    # the leader's target (the peers' mean) is detached, so the peers' logits are checked without a leader term
    assert torch.autograd.gradcheck(lambda z_l, a: fk.okddip_loss(z.detach(), z_l, a), (z_l, a))
    fk.okddip_loss(z, z_l, a).backward()
    z_ = z.detach().clone().requires_grad_()
    targets = torch.einsum("bij,jbk->ibk", a.detach(), z_)
    sum(fk.kd_loss(z_[i], targets[i], 3.0) for i in range(3)).backward()
    assert torch.allclose(z.grad, z_.grad)
    loss = fastkd.OKDDipLoss(in_dim=6, temperature=3.0, ramp_epochs=80).double()
    logits, pooled = rand(4, 4, 5, seed=3), rand(4, 4, 6, seed=4)
    full = loss(logits, pooled)
    close(loss(logits, pooled, epoch=41), math.exp(-5 * 0.25) * float(full.detach()), rel=1e-12)  # epoch counted from 1
    close(loss(logits, pooled, epoch=200), float(full.detach()), rel=1e-12)
    full.backward()
    assert float(loss.query.weight.grad.abs().sum()) > 0 and float(loss.key.weight.grad.abs().sum()) > 0


def test_sigmoid_rampup():
    assert fk.sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert fk.sigmoid_rampup(20, 80) == pytest.approx(math.exp(-5 * 0.75**2))
    assert fk.sigmoid_rampup(80, 80) == 1.0 and fk.sigmoid_rampup(500, 80) == 1.0 and fk.sigmoid_rampup(3, 0) == 1.0


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="branch_logits"):
        fk.online_kd_loss(rand(4, 5), rand(4, 5))
    with pytest.raises(ValueError, match="weights"):
        fk.classifier_diversity_loss([rand(3, 4)])
    with pytest.raises(ValueError, match="weights"):
        fk.classifier_diversity_loss([rand(3, 4), rand(3, 5)])
    with pytest.raises(ValueError, match="attention"):
        fk.okddip_loss(rand(3, 4, 5), rand(4, 5), rand(4, 2, 2))
    with pytest.raises(ValueError, match="target"):
        fk.branch_cross_entropy(rand(2, 3, 4), torch.tensor([0, 1, 9]))
    with pytest.raises(ValueError, match="3 branches"):
        fastkd.OKDDipLoss(in_dim=4).double()(rand(2, 3, 5), rand(2, 3, 4))
    with pytest.raises(ValueError, match="aggregation"):
        MultiBranchResNet(8, aggregation="max")


@pytest.mark.parametrize("aggregation", ["mean", "gate", "ffm"])
def test_multibranch_model(aggregation):
    torch.manual_seed(0)
    model = MultiBranchResNet(8, widths=(4, 4, 8, 8), num_branches=3, num_classes=5, aggregation=aggregation).double()
    model.train()
    x = rand(6, 3, 8, 8)
    out = model(x, branches=True)
    assert out.logits.shape == (3, 6, 5) and out.pooled.shape == (3, 6, 8) and out.shared.shape == (6, 8, 4, 4)
    assert len(out.features) == 3 and out.features[0].shape == (6, 8, 2, 2)
    assert torch.allclose(out.weights.sum(dim=1), torch.ones(6, dtype=torch.float64))
    expected = sum(out.weights[:, i:i + 1] * out.logits[i] for i in range(3))
    assert torch.allclose(out.ensemble, expected)
    assert torch.allclose(out.pooled[1], out.features[1].mean(dim=(2, 3)))
    assert torch.allclose(out.logits[2], model.branches[2]["fc"](out.pooled[2]))
    if aggregation == "mean":
        assert torch.allclose(out.weights, torch.full((6, 3), 1 / 3, dtype=torch.float64))
    else:  # learned weights differ per sample and get a gradient from the ensemble
        assert float(out.weights.detach().std(dim=0).sum()) > 0
        out.ensemble.sum().backward()
        owner = model.gate if aggregation == "gate" else model.fusion
        assert all(p.grad is not None for p in owner.parameters())
    model.eval()
    feats, logits = model(x, is_feat=True)
    assert [f.shape[1:] for f in feats] == [(4, 8, 8), (4, 8, 8), (8, 4, 4), (8, 2, 2), (8,)]
    assert torch.allclose(logits, model(x))


def test_multibranch_names_and_resnet32_layout():
    assert {"resnet32_mb3", "resnet32_mb4", "resnet32_one3", "resnet32_avg4"} <= set(fastkd.models.names())
    model = create("resnet32_mb4", num_classes=100)
    assert model.num_branches == 4 and model.aggregation == "ffm"
    assert len(model.layer1) == len(model.layer2) == len(model.branches[0]["layer3"]) == 5
    single = create("resnet32", num_classes=100)  # one branch = a ResNet-32's layer3 + fc
    branch = sum(p.numel() for p in model.branches[0].parameters())
    assert branch == sum(p.numel() for n, p in single.named_parameters() if n.startswith(("layer3", "fc")))
