"""ImageNet MobileNet v1: layout, parameter count, features, taps, and a functional re-derivation."""
import pytest
import torch
import torch.nn.functional as F

from fastkd.models import FeatureTap, create, default_taps
from fastkd.models.mobilenet_imagenet import BLOCKS

WIDTHS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + \
    [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]  # (in, out, stride), as Howard et al.'s Table 1


def _input(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_layout_and_parameter_count():
    assert [(o, s) for _, o, s in WIDTHS] == list(BLOCKS)
    model = create("mobilenet_v1")
    state = model.state_dict()
    # stem conv + BN, per block depthwise 3×3 + BN + pointwise 1×1 + BN, classifier
    count = 3 * 32 * 9 + 2 * 32 + sum(i * 9 + 2 * i + i * o + 2 * o for i, o, _ in WIDTHS) + 1024 * 1000 + 1000
    assert count == 4_231_976
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(state) == 6 + 13 * 12 + 2
    for key, shape in (("model.0.0.weight", (32, 3, 3, 3)), ("model.1.0.weight", (32, 1, 3, 3)),
                       ("model.1.3.weight", (64, 32, 1, 1)), ("model.13.4.running_var", (1024,)),
                       ("fc.weight", (1000, 1024))):
        assert tuple(state[key].shape) == shape, key
    assert create("mobilenet_v1", num_classes=7).fc.out_features == 7


def _reference(model, x):
    """The network written out with functional ops from the module's weights (eval-mode BN)."""
    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    stem = model.model[0]
    x = F.relu(bn(F.conv2d(x, stem[0].weight, stride=2, padding=1), stem[1]))
    for block, (inp, _, stride) in zip(model.model[1:], WIDTHS):
        x = F.relu(bn(F.conv2d(x, block[0].weight, stride=stride, padding=1, groups=inp), block[1]))
        x = F.relu(bn(F.conv2d(x, block[3].weight), block[4]))
    return F.linear(x.mean(dim=(2, 3)), model.fc.weight, model.fc.bias)


def test_forward_matches_a_functional_derivation():
    torch.manual_seed(0)
    model = create("mobilenet_v1", num_classes=10)
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    model.eval()
    x = _input(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), _reference(model, x), rtol=1e-5, atol=1e-5)


def test_features_preact_and_taps():
    torch.manual_seed(0)
    model = create("mobilenet_v1").eval()
    x = _input(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        feats, logits_feat = model(x, is_feat=True)
        pre, _ = model(x, is_feat=True, preact=True)
    assert torch.equal(logits, logits_feat) and logits.shape == (2, 1000)
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4),
                                                   (1024, 2, 2), (1024,)]
    assert (pre[2] < 0).any() and not (feats[2] < 0).any()
    assert torch.equal(pre[2].clamp_min(0), feats[2])
    for preact, want in ((False, feats), (True, pre)):
        with torch.no_grad(), FeatureTap(model, default_taps(model, preact=preact)) as tap:
            _, tapped = tap(x)
        assert len(tapped) == len(want) and all(torch.equal(a, b) for a, b in zip(tapped, want)), preact
    assert [bn.num_features for bn in model.get_bn_before_relu()] == [128, 256, 512, 1024]


def test_trains_a_step_as_a_student():
    torch.manual_seed(0)
    model = create("mobilenet_v1", num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _input(2, 3, 32, 32), torch.tensor([0, 2])
    before = F.cross_entropy(model(x), y)
    before.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert not torch.equal(before, F.cross_entropy(model(x), y))


@pytest.mark.parametrize("bad", [0, -1, True])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        create("mobilenet_v1", num_classes=bad)
