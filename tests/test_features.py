"""Feature-map losses (Hint, AT, NST, FT, AB, FSP, VID) and RepDistiller's adapters (ConvReg,
Paraphraser, Translator) against independent float64 derivations in numpy with explicit loops."""
import math

import numpy as np
import pytest
import torch

import fastkd
from fastkd import functional as F


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def npy(x):
    return x.detach().double().numpy()


def np_pool(x, out_h, out_w):
    """Adaptive average pooling with explicit loops: cell i covers [floor(i·H/o), ceil((i+1)·H/o))."""
    B, C, H, W = x.shape
    out = np.empty((B, C, out_h, out_w))
    for i in range(out_h):
        h0, h1 = (i * H) // out_h, -((-(i + 1) * H) // out_h)
        for j in range(out_w):
            w0, w1 = (j * W) // out_w, -((-(j + 1) * W) // out_w)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def np_pool_pair(a, b):
    """RepDistiller's rule by heights: the map with the larger H is pooled to the other's size."""
    if a.shape[2] > b.shape[2]:
        return np_pool(a, *b.shape[2:]), b
    if a.shape[2] < b.shape[2]:
        return a, np_pool(b, *a.shape[2:])
    return a, b


def np_rownorm(v):
    return v / max(math.sqrt((v * v).sum()), 1e-12)


def np_spatial_map(f, p):
    """[B, H·W]: per sample, rownorm of the channel mean of f^p."""
    return np.stack([np_rownorm((f[b] ** p).mean(axis=0).ravel()) for b in range(f.shape[0])])


def np_at(f_s, f_t, p=2):
    f_s, f_t = np_pool_pair(npy(f_s), npy(f_t))
    return float(((np_spatial_map(f_s, p) - np_spatial_map(f_t, p)) ** 2).mean())


def np_ft(f_s, f_t, p1=2, p2=1):
    f_s, f_t = np_pool_pair(npy(f_s), npy(f_t))
    return float((np.abs(np_spatial_map(f_s, p1) - np_spatial_map(f_t, p1)) ** p2).mean())


def np_nst(f_s, f_t):
    f_s, f_t = np_pool_pair(npy(f_s), npy(f_t))
    B = f_s.shape[0]

    def kernel_mean(a, b):
        total = 0.0
        for n in range(B):
            rows_a = [np_rownorm(a[n, i].ravel()) for i in range(a.shape[1])]
            rows_b = [np_rownorm(b[n, j].ravel()) for j in range(b.shape[1])]
            total += sum(float(np.dot(x, y)) ** 2 for x in rows_a for y in rows_b)
        return total / (B * a.shape[1] * b.shape[1])

    return kernel_mean(f_t, f_t) + kernel_mean(f_s, f_s) - 2 * kernel_mean(f_s, f_t)


def np_ab(g_s, g_t, m=1.0):
    n, total = len(g_s), 0.0
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        s, t = npy(s), npy(t)
        off = np.where((s > -m) & (t <= 0), (s + m) ** 2, 0.0)
        on = np.where((s <= m) & (t > 0), (s - m) ** 2, 0.0)
        total += 2.0 ** (i - n + 1) * float((off + on).sum()) / s.shape[0] * 3 / 1000
    return total


def np_fsp_matrices(g):
    out = []
    for bot, top in zip(g, g[1:]):
        bot, top = np_pool_pair(npy(bot), npy(top))
        G = np.empty((bot.shape[0], top.shape[1], bot.shape[1]))
        for n in range(bot.shape[0]):
            for i in range(top.shape[1]):
                for j in range(bot.shape[1]):
                    G[n, i, j] = (top[n, i] * bot[n, j]).mean()
        out.append(G)
    return out


def np_fsp(g_s, g_t):
    return sum(float(((a - b) ** 2).mean()) for a, b in zip(np_fsp_matrices(g_s), np_fsp_matrices(g_t)))


def np_vid(module, x, target):
    """RepDistiller's VID with its published softplus log(1 + exp(ℓ)), 1×1 convs as einsums."""
    x, target = np_pool_pair(npy(x), npy(target))
    w = [npy(module.regressor[i].weight)[:, :, 0, 0] for i in (0, 2, 4)]
    h = np.maximum(np.einsum("oc,bchw->bohw", w[0], x), 0)
    h = np.maximum(np.einsum("oc,bchw->bohw", w[1], h), 0)
    mu = np.einsum("oc,bchw->bohw", w[2], h)
    var = (np.log(1.0 + np.exp(npy(module.log_scale))) + module.eps)[None, :, None, None]
    return float((0.5 * ((mu - target) ** 2 / var + np.log(var))).mean())


# shape pairs: equal, student larger, teacher larger with a non-divisible ratio, non-square, B = 1
MAP_PAIRS = [
    ((2, 3, 4, 4), (2, 5, 4, 4)),
    ((2, 3, 8, 8), (2, 5, 4, 4)),
    ((2, 3, 3, 3), (2, 6, 7, 7)),
    ((2, 5, 6, 4), (2, 3, 3, 2)),
    ((1, 7, 5, 5), (1, 3, 2, 2)),
]


# ---------------------------------------------------------------- FitNet / Hint + ConvReg


@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 7, 3, 4), (5, 9)])
def test_hint_value(shape):
    f_s, f_t = rand(*shape, seed=1), rand(*shape, seed=2)
    a, b = npy(f_s).ravel(), npy(f_t).ravel()
    ref = sum((x - y) ** 2 for x, y in zip(a, b)) / a.size
    assert F.hint_loss(f_s, f_t).item() == pytest.approx(ref, rel=1e-12)
    assert fastkd.HintLoss()(f_s, f_t).item() == F.hint_loss(f_s, f_t).item()


@pytest.mark.parametrize("s_shape,t_shape,kind,kernel,stride", [
    ((2, 3, 8, 8), (2, 5, 4, 4), torch.nn.Conv2d, (3, 3), (2, 2)),
    ((2, 3, 4, 4), (2, 5, 8, 8), torch.nn.ConvTranspose2d, (4, 4), (2, 2)),
    ((1, 3, 7, 6), (1, 5, 4, 4), torch.nn.Conv2d, (4, 3), (1, 1)),
    ((2, 3, 5, 5), (2, 5, 5, 5), torch.nn.Conv2d, (1, 1), (1, 1)),
])
def test_convreg_layers_and_value(s_shape, t_shape, kind, kernel, stride):
    torch.manual_seed(0)
    reg = fastkd.ConvReg(s_shape, t_shape).double()
    assert type(reg.conv) is kind and reg.conv.kernel_size == kernel and reg.conv.stride == stride
    assert list(reg.state_dict()) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                      "bn.running_var", "bn.num_batches_tracked"]
    x = rand(*s_shape, seed=3)
    out = reg(x)
    assert out.shape == t_shape
    y = npy(reg.conv(x))  # BatchNorm2d (batch statistics, weight 1, bias 0) then ReLU, by hand
    mean = y.mean(axis=(0, 2, 3), keepdims=True)
    var = y.var(axis=(0, 2, 3), keepdims=True)
    ref = np.maximum((y - mean) / np.sqrt(var + 1e-5), 0)
    np.testing.assert_allclose(npy(out), ref, rtol=1e-9, atol=1e-12)
    no_relu = fastkd.ConvReg(s_shape, t_shape, use_relu=False).double()
    assert no_relu.use_relu is False and (no_relu(x) < 0).any()


def test_convreg_errors():
    with pytest.raises(ValueError, match="s_shape"):
        fastkd.ConvReg((2, 3, 3, 3), (2, 5, 5, 5))
    with pytest.raises(ValueError, match="s_shape"):
        fastkd.ConvReg((2, 3, 7, 3), (2, 5, 4, 4))
    with pytest.raises(ValueError, match="s_shape"):
        fastkd.ConvReg((3, 8, 8), (2, 5, 4, 4))
    reg = fastkd.ConvReg((2, 3, 8, 8), (2, 5, 4, 4))
    with pytest.raises(ValueError, match="f_s"):
        reg(torch.randn(2, 4, 8, 8))
    with pytest.raises(TypeError, match="f_s"):
        reg(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="f_s"):
        reg(torch.randn(3, 8, 8))


def test_hint_gradcheck_through_convreg():
    reg = fastkd.ConvReg((2, 3, 4, 4), (2, 2, 2, 2)).double()
    x, t = rand(2, 3, 4, 4, seed=4).requires_grad_(True), rand(2, 2, 2, 2, seed=5)
    w = reg.conv.weight.detach().clone().requires_grad_(True)

    def loss(x, w):
        return fastkd.HintLoss()(torch.func.functional_call(reg, {"conv.weight": w}, (x,)), t)

    assert torch.autograd.gradcheck(loss, (x, w))


# ---------------------------------------------------------------- AT, NST, FT


@pytest.mark.parametrize("s_shape,t_shape", MAP_PAIRS)
@pytest.mark.parametrize("p", [2, 3])
def test_at_value(s_shape, t_shape, p):
    f_s, f_t = rand(*s_shape, seed=6), rand(*t_shape, seed=7)
    got = F.at_loss(f_s, f_t, p=p)
    assert got.shape == () and got.item() == pytest.approx(np_at(f_s, f_t, p), rel=1e-10)
    assert fastkd.ATLoss(p=p)(f_s, f_t).item() == got.item()


@pytest.mark.parametrize("s_shape,t_shape", MAP_PAIRS)
def test_nst_value(s_shape, t_shape):
    f_s, f_t = rand(*s_shape, seed=8), rand(*t_shape, seed=9)
    got = F.nst_loss(f_s, f_t)
    assert got.shape == () and got.item() == pytest.approx(np_nst(f_s, f_t), rel=1e-10, abs=1e-13)
    assert fastkd.NSTLoss()(f_s, f_t).item() == got.item()
    assert F.nst_loss(f_t, f_t).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("s_shape,t_shape", MAP_PAIRS)
@pytest.mark.parametrize("p1,p2", [(2, 1), (2, 2), (1, 3)])
def test_ft_value(s_shape, t_shape, p1, p2):
    f_s, f_t = rand(*s_shape, seed=10), rand(*t_shape, seed=11)
    got = F.ft_loss(f_s, f_t, p1=p1, p2=p2)
    assert got.shape == () and got.item() == pytest.approx(np_ft(f_s, f_t, p1, p2), rel=1e-10)
    assert fastkd.FTLoss(p1=p1, p2=p2)(f_s, f_t).item() == got.item()


@pytest.mark.parametrize("loss,ref", [(F.at_loss, np_at), (F.nst_loss, np_nst)])
def test_sequences_are_summed(loss, ref):
    g_s = [rand(2, 3, 8, 8, seed=12), rand(2, 5, 4, 4, seed=13), rand(2, 7, 2, 2, seed=14)]
    g_t = [rand(2, 4, 8, 8, seed=15), rand(2, 6, 4, 4, seed=16), rand(2, 9, 4, 4, seed=17)]
    expected = sum(ref(s, t) for s, t in zip(g_s, g_t))
    assert loss(g_s, g_t).item() == pytest.approx(expected, rel=1e-10)
    assert loss(tuple(g_s), tuple(g_t)).item() == pytest.approx(expected, rel=1e-10)
    assert loss(g_s[:1], g_t[:1]).item() == loss(g_s[0], g_t[0]).item()


def test_at_gradcheck():
    f_s = rand(2, 3, 4, 4, seed=18).requires_grad_(True)
    f_t = rand(2, 5, 2, 2, seed=19).requires_grad_(True)
    assert torch.autograd.gradcheck(F.at_loss, (f_s, f_t))
    g_s = [rand(1, 3, 3, 3, seed=20).requires_grad_(True), rand(1, 2, 2, 2, seed=21).requires_grad_(True)]
    g_t = [rand(1, 3, 5, 5, seed=22), rand(1, 4, 2, 2, seed=23)]
    assert torch.autograd.gradcheck(lambda a, b: fastkd.ATLoss()([a, b], g_t), tuple(g_s))


def test_nst_gradcheck_and_detached_teacher_kernel():
    f_s = rand(2, 3, 4, 4, seed=24).requires_grad_(True)
    f_t = rand(2, 4, 2, 2, seed=25).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: F.nst_loss(a, f_t), (f_s,))
    # d/df_t holds only the cross term −2 mean k(s, t): the k(t, t) term is detached
    F.nst_loss(f_s, f_t).backward()
    t_only = f_t.detach().clone().requires_grad_(True)
    s_pooled = torch.nn.functional.adaptive_avg_pool2d(f_s.detach(), (2, 2))
    s_rows = torch.nn.functional.normalize(s_pooled.flatten(2), dim=2)
    t_rows = torch.nn.functional.normalize(t_only.flatten(2), dim=2)
    cross = torch.einsum("bin,bjn->bij", s_rows, t_rows).pow(2).mean()
    (-2 * cross).backward()
    torch.testing.assert_close(f_t.grad, t_only.grad, rtol=1e-10, atol=1e-12)


def test_ft_gradcheck_through_translator():
    torch.manual_seed(1)
    translator = fastkd.Translator((2, 3, 4, 4), (2, 6, 2, 2), use_bn=False).double()
    x = rand(2, 3, 4, 4, seed=26).requires_grad_(True)
    factor_t = rand(2, 3, 2, 2, seed=27)
    assert torch.autograd.gradcheck(lambda a: fastkd.FTLoss()(translator(a), factor_t), (x,))
    assert torch.autograd.gradcheck(lambda a: F.ft_loss(a, factor_t, p2=2), (x.detach()[:, :, :2, :2]
                                                                             .clone().requires_grad_(True),))


def test_paraphraser_and_translator_match_repdistiller():
    torch.manual_seed(2)
    para = fastkd.Paraphraser((2, 7, 4, 4))  # int(7 · 0.5) = 3 factor channels
    assert list(para.state_dict()) == [
        "encoder.0.weight", "encoder.0.bias", "encoder.3.weight", "encoder.3.bias", "encoder.6.weight",
        "encoder.6.bias", "decoder.0.weight", "decoder.0.bias", "decoder.3.weight", "decoder.3.bias",
        "decoder.6.weight", "decoder.6.bias"]
    assert [tuple(para.state_dict()[k].shape) for k in ("encoder.3.weight", "decoder.3.weight")] == \
        [(3, 7, 3, 3), (3, 7, 3, 3)]  # Conv2d (out, in, k, k) and ConvTranspose2d (in, out, k, k)
    para_bn = fastkd.Paraphraser((2, 7, 4, 4), k=0.5, use_bn=True)
    assert [k for k in para_bn.state_dict() if k.endswith("running_mean")] == [
        "encoder.1.running_mean", "encoder.4.running_mean", "encoder.7.running_mean",
        "decoder.1.running_mean", "decoder.4.running_mean", "decoder.7.running_mean"]
    trans = fastkd.Translator((2, 5, 4, 4), (2, 7, 4, 4))
    assert list(trans.state_dict()) == [
        "encoder.0.weight", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias", "encoder.1.running_mean",
        "encoder.1.running_var", "encoder.1.num_batches_tracked", "encoder.3.weight", "encoder.3.bias",
        "encoder.4.weight", "encoder.4.bias", "encoder.4.running_mean", "encoder.4.running_var",
        "encoder.4.num_batches_tracked", "encoder.6.weight", "encoder.6.bias", "encoder.7.weight", "encoder.7.bias",
        "encoder.7.running_mean", "encoder.7.running_var", "encoder.7.num_batches_tracked"]
    assert [type(m).__name__ for m in trans.encoder] == ["Conv2d", "BatchNorm2d", "LeakyReLU"] * 3
    assert all(m.negative_slope == 0.1 for m in trans.encoder if isinstance(m, torch.nn.LeakyReLU))
    f_t, f_s = torch.randn(1, 7, 4, 4), torch.randn(2, 5, 4, 4)
    factor, rec = para(f_t)
    assert factor.shape == (1, 3, 4, 4) and rec.shape == (1, 7, 4, 4)
    torch.testing.assert_close(para(f_t, is_factor=True), factor, rtol=0, atol=0)
    assert trans(f_s).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="f_s"):
        trans(f_t)
    with pytest.raises(ValueError, match=r"\bf\b"):
        para(f_s)
    with pytest.raises(ValueError, match="k"):
        fastkd.Paraphraser((2, 1, 4, 4), k=0.5)


# ---------------------------------------------------------------- AB


def test_ab_value_weights_and_module():
    shapes = [(2, 3, 8, 8), (2, 5, 4, 4), (2, 7, 3, 3)]
    g_s = [rand(*s, seed=30 + i) for i, s in enumerate(shapes)]
    g_t = [rand(*s, seed=40 + i) for i, s in enumerate(shapes)]
    got = F.ab_loss(g_s, g_t)
    assert got.item() == pytest.approx(np_ab(g_s, g_t), rel=1e-12)
    assert fastkd.ABLoss()(g_s, g_t).item() == got.item()
    single = np_ab(g_s[2:], g_t[2:])
    assert F.ab_loss(g_s[2], g_t[2]).item() == pytest.approx(single, rel=1e-12)
    # weights 1/4, 1/2, 1 for three pairs
    parts = [np_ab([s], [t]) for s, t in zip(g_s, g_t)]
    assert got.item() == pytest.approx(parts[0] / 4 + parts[1] / 2 + parts[2], rel=1e-12)
    assert F.ab_loss(g_s, g_t, margin=0.5).item() == pytest.approx(np_ab(g_s, g_t, 0.5), rel=1e-12)
    assert fastkd.ABLoss(margin=0.5)(g_s[:1], g_t[:1]).item() == pytest.approx(np_ab(g_s[:1], g_t[:1], 0.5),
                                                                              rel=1e-12)


def test_ab_boundaries():
    """t = 0 counts as off; s = −m is already off (no penalty), s = m is not yet on (penalised, by 0)."""
    s = torch.tensor([[-1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 2.0, -2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1e-9, -3.0, 3.0]], dtype=torch.float64)
    # per element: off-penalty (s+1)² where s > −1 and t ≤ 0; on-penalty (s−1)² where s ≤ 1 and t > 0
    per_element = [0.0, 4.0, 4.0, 0.0, 1.0, 1.0, 9.0, 9.0]
    assert F.ab_loss(s, t).item() == pytest.approx(sum(per_element) * 3 / 1000, rel=1e-12)
    assert np_ab([s], [t]) == pytest.approx(sum(per_element) * 3 / 1000, rel=1e-12)


def test_ab_gradcheck():
    g_s = [rand(1, 3, 3, 3, seed=50).requires_grad_(True), rand(1, 2, 2, 2, seed=51).requires_grad_(True)]
    g_t = [rand(1, 3, 3, 3, seed=52), rand(1, 2, 2, 2, seed=53)]
    assert torch.autograd.gradcheck(lambda a, b: F.ab_loss([a, b], g_t), tuple(g_s))


# ---------------------------------------------------------------- FSP


def fsp_maps(seed, sizes, channels=(3, 5, 7), batch=2):
    return [rand(batch, c, h, w, seed=seed + i) for i, (c, (h, w)) in enumerate(zip(channels, sizes))]


def test_fsp_value():
    g_s = fsp_maps(60, [(8, 8), (4, 4), (4, 4)])
    g_t = fsp_maps(70, [(4, 4), (4, 4), (2, 2)])  # teacher sizes differ from the student's
    got = F.fsp_loss(g_s, g_t)
    assert got.shape == () and got.item() == pytest.approx(np_fsp(g_s, g_t), rel=1e-10)
    assert fastkd.FSPLoss()(g_s, g_t).item() == got.item()
    b1_s, b1_t = fsp_maps(80, [(5, 5), (3, 3)], (3, 1), batch=1), fsp_maps(90, [(3, 3), (5, 5)], (3, 1), batch=1)
    assert F.fsp_loss(b1_s, b1_t).item() == pytest.approx(np_fsp(b1_s, b1_t), rel=1e-10)


def test_fsp_gradcheck():
    g_s = [m.requires_grad_(True) for m in fsp_maps(100, [(4, 4), (2, 2), (2, 2)], (2, 3, 1), batch=1)]
    g_t = fsp_maps(110, [(2, 2), (2, 2), (2, 2)], (2, 3, 1), batch=1)
    assert torch.autograd.gradcheck(lambda *a: F.fsp_loss(list(a), g_t), tuple(g_s))


def test_fsp_errors():
    g_s = fsp_maps(120, [(4, 4), (4, 4)], (3, 5))
    with pytest.raises(ValueError, match=r"g_t\[1\]"):
        F.fsp_loss(g_s, fsp_maps(130, [(4, 4), (4, 4)], (3, 6)))
    with pytest.raises(ValueError, match="at least 2"):
        F.fsp_loss(g_s[:1], g_s[:1])
    with pytest.raises(ValueError, match="at least 2"):
        F.fsp_loss(g_s[0], g_s[0])
    with pytest.raises(ValueError, match="g_t"):
        F.fsp_loss(g_s, g_s[:1])
    with pytest.raises(TypeError, match=r"g_s\[1\]"):
        F.fsp_loss([g_s[0], g_s[1].float()], g_s)
    with pytest.raises(ValueError, match=r"g_s\[1\]"):
        F.fsp_loss([g_s[0], rand(2, 5, 2, 8)], [g_s[0], rand(2, 5, 2, 8)])


# ---------------------------------------------------------------- VID


@pytest.mark.parametrize("s_shape,t_shape", [((2, 3, 4, 4), (2, 5, 4, 4)), ((1, 3, 8, 8), (1, 5, 4, 4)),
                                             ((2, 3, 3, 3), (2, 5, 7, 7))])
def test_vid_value(s_shape, t_shape):
    torch.manual_seed(3)
    vid = fastkd.VIDLoss(3, 4, 5).double()
    with torch.no_grad():
        vid.log_scale.copy_(rand(5, seed=140))
    x, t = rand(*s_shape, seed=141), rand(*t_shape, seed=142)
    got = vid(x, t)
    assert got.shape == () and got.item() == pytest.approx(np_vid(vid, x, t), rel=1e-10)
    pooled_x = x if s_shape[2] <= t_shape[2] else torch.nn.functional.adaptive_avg_pool2d(x, t_shape[2:])
    pooled_t = t if t_shape[2] <= s_shape[2] else torch.nn.functional.adaptive_avg_pool2d(t, s_shape[2:])
    assert F.vid_loss(vid.regressor(pooled_x), pooled_t, vid.log_scale, vid.eps).item() == got.item()


def test_vid_parameters_match_repdistiller():
    vid = fastkd.VIDLoss(3, 4, 5)
    assert list(vid.state_dict()) == ["log_scale", "regressor.0.weight", "regressor.2.weight", "regressor.4.weight"]
    assert [tuple(vid.state_dict()[k].shape) for k in vid.state_dict()] == [(5,), (4, 3, 1, 1), (4, 4, 1, 1),
                                                                             (5, 4, 1, 1)]
    assert [type(m).__name__ for m in vid.regressor] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d"]
    expected = math.log(math.exp(5.0 - 1e-5) - 1.0)  # σ² = softplus(ℓ) + eps = 5
    torch.testing.assert_close(vid.log_scale.detach(), torch.full((5,), expected), rtol=1e-7, atol=0)
    var = torch.log(1 + torch.exp(vid.log_scale.double())) + 1e-5
    torch.testing.assert_close(var, torch.full((5,), 5.0, dtype=torch.float64), rtol=1e-6, atol=0)
    assert fastkd.VIDLoss(3, 4, 5, init_pred_var=2.0).log_scale[0].item() == pytest.approx(
        math.log(math.exp(2.0 - 1e-5) - 1.0), rel=1e-6)


def test_vid_gradcheck_input_log_scale_and_regressor():
    torch.manual_seed(4)
    vid = fastkd.VIDLoss(2, 3, 2).double()
    x = rand(2, 2, 4, 4, seed=150).requires_grad_(True)
    t = rand(2, 2, 2, 2, seed=151)
    log_scale = rand(2, seed=152).requires_grad_(True)
    w0 = vid.regressor[0].weight.detach().clone().requires_grad_(True)

    def loss(x, log_scale, w0):
        return torch.func.functional_call(vid, {"log_scale": log_scale, "regressor.0.weight": w0}, (x, t))

    assert torch.autograd.gradcheck(loss, (x, log_scale, w0))


def test_vid_errors():
    vid = fastkd.VIDLoss(3, 4, 5)
    x, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    with pytest.raises(ValueError, match="input"):
        vid(torch.randn(2, 4, 4, 4), t)
    with pytest.raises(ValueError, match="target"):
        vid(x, torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match="target"):
        vid(x, torch.randn(3, 5, 4, 4))
    with pytest.raises(TypeError, match="input"):
        vid(x.double(), t.double())
    with pytest.raises(TypeError, match="target"):
        vid(x, t.double())
    bad = t.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="target contains NaN"):
        vid(x, bad)
    with pytest.raises(ValueError, match="log_scale"):
        F.vid_loss(t, t, torch.zeros(4))
    with pytest.raises(ValueError, match="target"):
        F.vid_loss(t, t[:, :, :2], torch.zeros(5))
    with pytest.raises(ValueError, match="init_pred_var"):
        fastkd.VIDLoss(3, 4, 5, init_pred_var=0.0)


# ---------------------------------------------------------------- shared errors and syncs


@pytest.mark.parametrize("loss", [F.at_loss, F.nst_loss, F.ft_loss])
def test_pooled_pair_errors(loss):
    names = ("factor_s", "factor_t") if loss is F.ft_loss else ("f_s", "f_t")
    f_s, f_t = rand(2, 3, 4, 4), rand(2, 5, 2, 2)
    with pytest.raises(TypeError, match=names[0]):
        loss(npy(f_s), f_t)
    with pytest.raises(TypeError, match=names[1]):
        loss(f_s, f_t.long())
    with pytest.raises(TypeError, match=names[1]):
        loss(f_s, f_t.float())
    with pytest.raises(ValueError, match=names[1]):
        loss(f_s, rand(3, 5, 2, 2))
    with pytest.raises(ValueError, match=names[0]):
        loss(f_s[0], f_t)
    with pytest.raises(ValueError, match=names[1]):
        loss(f_s, rand(2, 5, 2, 8))  # (4, 4) vs (2, 8): neither fits inside the other
    bad = f_t.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{names[1]} contains NaN"):
        loss(f_s, bad)


@pytest.mark.parametrize("loss", [F.at_loss, F.nst_loss, F.ab_loss])
def test_sequence_errors(loss):
    s_name, t_name = ("g_s", "g_t") if loss is F.ab_loss else ("f_s", "f_t")
    maps = [rand(2, 3, 4, 4), rand(2, 3, 4, 4, seed=1)]
    with pytest.raises(ValueError, match=t_name):
        loss(maps, maps[:1])
    with pytest.raises(ValueError, match=s_name):
        loss([], [])
    with pytest.raises(TypeError, match=t_name):
        loss(maps, maps[0])
    with pytest.raises(TypeError, match=rf"{s_name}\[1\]"):
        loss([maps[0], "map"], maps)
    bad = maps[1].clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"{t_name}\[1\] contains Inf"):
        loss(maps, [maps[0], bad])


def test_hint_and_ab_errors():
    f = rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="f_t"):
        F.hint_loss(f, f[:, :2])
    with pytest.raises(TypeError, match="f_t"):
        fastkd.HintLoss()(f, f.float())
    with pytest.raises(ValueError, match="g_t"):
        F.ab_loss(f, f[:, :, :2])
    bad = f.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="f_s contains NaN"):
        F.hint_loss(bad, f)


def test_losses_run_on_meta_without_reading_data():
    """No host sync in the math: with value checks off every loss runs on data-less meta tensors."""
    def m(*shape):
        return torch.empty(shape, device="meta")

    with torch.device("meta"):
        vid = fastkd.VIDLoss(3, 4, 5)
    with fastkd.value_checks(False):
        losses = [F.hint_loss(m(2, 3, 4, 4), m(2, 3, 4, 4)), F.at_loss(m(2, 3, 8, 8), m(2, 5, 4, 4)),
                  F.nst_loss([m(2, 3, 8, 8)], [m(2, 5, 4, 4)]), F.ft_loss(m(2, 3, 4, 4), m(2, 3, 4, 4)),
                  F.ab_loss([m(2, 3, 4, 4)] * 2, [m(2, 3, 4, 4)] * 2),
                  F.fsp_loss([m(2, 3, 8, 8), m(2, 5, 4, 4)], [m(2, 3, 4, 4), m(2, 5, 4, 4)]),
                  vid(m(2, 3, 8, 8), m(2, 5, 4, 4))]
    assert all(loss.shape == () and loss.device.type == "meta" for loss in losses)


def test_connector_is_identity_or_convreg_without_relu():
    s_shapes, t_shapes = [(2, 8, 8, 8), (2, 16, 4, 4)], [(2, 8, 8, 8), (2, 32, 4, 4)]
    connector = fastkd.Connector(s_shapes, t_shapes)
    assert sorted(connector.state_dict()) == sorted(
        f"connectors.1.{k}" for k in ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                      "bn.running_var", "bn.num_batches_tracked"))
    x = [torch.randn(s) for s in s_shapes]
    out = connector(x)
    assert out[0] is x[0] and out[1].shape == (2, 32, 4, 4)
    assert (out[1] < 0).any()  # no ReLU: AB compares against pre-activation (signed) teacher maps
    with pytest.raises(ValueError, match="sequence of 2 maps"):
        connector(x[:1])
    with pytest.raises(ValueError, match="equal length"):
        fastkd.Connector(s_shapes, t_shapes[:1])
