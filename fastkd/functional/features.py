"""Feature-map distillation: FitNet hints, AT, NST, FT, AB, FSP and VID, as RepDistiller computes them.

Maps are [B, C, H, W]. Where a loss compares maps of different spatial sizes (AT, NST, FT, FSP,
VID) the larger one is adaptive-average-pooled to the smaller one's (H, W) first — RepDistiller's
``adaptive_avg_pool2d(x, (H, H))`` for the square maps it uses; one map must be at least as large
as the other in both H and W. AT, NST and AB take one pair of tensors or two equal-length
sequences of them; a sequence gives the sum of the per-pair losses (RepDistiller returns the list
and its training script sums it). Losses are computed in the dtype of their inputs (NST: in fp32).
An empty batch (B = 0, where the published means are 0/0) raises ``ValueError`` naming the map.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fastkd import _checks
from fastkd.ops import nst as nst_ops

__all__ = ["hint_loss", "at_loss", "nst_loss", "ft_loss", "ab_loss", "fsp_loss", "vid_loss"]

_Maps = torch.Tensor | Sequence[torch.Tensor]
_NamedPair = tuple[str, torch.Tensor, str, torch.Tensor]


def _check_map_pair(name_s: str, f_s, name_t: str, f_t) -> None:
    """Two [B, C, H, W] maps of one batch size, dtype and device, both finite."""
    _checks.pair_of(name_s, f_s, name_t, f_t, ndim=4)


def _pool_to_smaller(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger of two maps to the smaller one's (H, W); the other is unchanged."""
    size_a, size_b = tuple(a.shape[-2:]), tuple(b.shape[-2:])
    if size_a == size_b:
        return a, b
    if size_a[0] >= size_b[0] and size_a[1] >= size_b[1]:
        return F.adaptive_avg_pool2d(a, size_b), b
    if size_b[0] >= size_a[0] and size_b[1] >= size_a[1]:
        return a, F.adaptive_avg_pool2d(b, size_a)
    raise ValueError(f"{name_a} has spatial size {size_a} and {name_b} has {size_b}; one map must be at least "
                     "as large as the other in both height and width to be pooled to it")


def _sum_over_pairs(name_s: str, g_s: _Maps, name_t: str, g_t: _Maps,
                    pair_loss: Callable[[str, torch.Tensor, str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """pair_loss of one pair of tensors, or the sum of pair_loss over two sequences of them."""
    return sum(pair_loss(*pair) for pair in _checks.named_pairs(name_s, g_s, name_t, g_t))


def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """FitNet hints (Romero, Ballas, Kahou, Chassang, Gatta, Bengio 2015), as RepDistiller's ``HintLoss``.

    loss = mean((f_s − f_t)²) over every element; ``f_s`` is the regressed student feature
    (:class:`fastkd.ConvReg`), of the teacher feature's shape.
    """
    _checks.pair_of("f_s", f_s, "f_t", f_t, min_ndim=1, same_shape=True)
    return F.mse_loss(f_s, f_t)


def _spatial_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """rownorm(mean_c f^p flattened over space): [B, H·W], AT's attention map and FT's factor."""
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1)


def _at_pair(name_s: str, f_s: torch.Tensor, name_t: str, f_t: torch.Tensor, p: float) -> torch.Tensor:
    """AT for one pair of maps."""
    _check_map_pair(name_s, f_s, name_t, f_t)
    f_s, f_t = _pool_to_smaller(name_s, f_s, name_t, f_t)
    return (_spatial_map(f_s, p) - _spatial_map(f_t, p)).pow(2).mean()


def at_loss(f_s: _Maps, f_t: _Maps, p: float = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko, Komodakis 2017), as RepDistiller's ``Attention``.

    Per pair, after pooling to equal size: a(f) = rownorm(mean_c f^p flattened), loss =
    mean over B·H·W of (a(f_s) − a(f_t))². Channel counts may differ; sequences are summed.
    ``p`` > 0 (RepDistiller: 2; a fractional p needs non-negative maps, as after a ReLU).
    """
    p = _checks.number("p", p, positive=True)
    return _sum_over_pairs("f_s", f_s, "f_t", f_t, functools.partial(_at_pair, p=p))


def _nst_pair(name_s: str, f_s: torch.Tensor, name_t: str, f_t: torch.Tensor) -> torch.Tensor:
    """NST for one pair of maps."""
    _check_map_pair(name_s, f_s, name_t, f_t)
    f_s, f_t = _pool_to_smaller(name_s, f_s, name_t, f_t)
    return nst_ops.nst(f_s.flatten(2), f_t.flatten(2))


def nst_loss(f_s: _Maps, f_t: _Maps) -> torch.Tensor:
    """Neuron selectivity transfer (Huang, Wang 2017), as RepDistiller's ``NSTLoss``.

    Per pair, after pooling: each channel flattened over space and rownormed; k(x, y) = (x·y)²
    over all channel pairs; loss = mean k(t, t) (no gradient) + mean k(s, s) − 2 mean k(s, t).
    Channel counts may differ; sequences are summed. Computed in fp32 for fp16 / bf16 maps (the loss
    comes back in fp32), on the fused op ``fastkd::nst_loss`` unless the ``torch`` backend is selected
    (:func:`fastkd.ops.nst.nst`).
    """
    return _sum_over_pairs("f_s", f_s, "f_t", f_t, _nst_pair)


def ft_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, p1: float = 2, p2: float = 1) -> torch.Tensor:
    """Factor transfer (Kim, Park, Kwak 2018), as RepDistiller's ``FactorTransfer``.

    After pooling: F(x) = rownorm(mean_c x^p1 flattened); loss = mean |F(factor_s) − F(factor_t)|^p2.
    ``factor_s`` is the translator's output on the student map, ``factor_t`` the paraphraser's
    factor of the teacher map (:class:`fastkd.Translator`, :class:`fastkd.Paraphraser`). p1, p2 > 0
    (RepDistiller: 2, 1).
    """
    p1 = _checks.number("p1", p1, positive=True)
    p2 = _checks.number("p2", p2, positive=True)
    _check_map_pair("factor_s", factor_s, "factor_t", factor_t)
    factor_s, factor_t = _pool_to_smaller("factor_s", factor_s, "factor_t", factor_t)
    return (_spatial_map(factor_s, p1) - _spatial_map(factor_t, p1)).abs().pow(p2).mean()


def _ab_pair(name_s: str, s: torch.Tensor, name_t: str, t: torch.Tensor, margin: float) -> torch.Tensor:
    """Σ (s + m)²·[s > −m ∧ t ≤ 0] + (s − m)²·[s ≤ m ∧ t > 0] over every element."""
    _checks.pair_of(name_s, s, name_t, t, min_ndim=1, same_shape=True)
    should_be_off = (s > -margin) & (t <= 0)
    should_be_on = (s <= margin) & (t > 0)
    return ((s + margin).pow(2) * should_be_off + (s - margin).pow(2) * should_be_on).sum()


def ab_loss(g_s: _Maps, g_t: _Maps, margin: float = 1.0) -> torch.Tensor:
    """Activation boundaries (Heo, Lee, Yun, Choi 2019), as RepDistiller's ``ABLoss``.

    For pair i of n (pre-activation maps of equal shape; the student's after its connector):
    loss = Σ_i 2^(i−n+1) · Σ [(s+m)²·[s > −m ∧ t ≤ 0] + (s−m)²·[s ≤ m ∧ t > 0]] / B · 3/1000.
    One pair of tensors is n = 1. The margin m ≥ 0 (RepDistiller: 1).
    """
    margin = _checks.number("margin", margin, nonnegative=True)
    pairs = _checks.named_pairs("g_s", g_s, "g_t", g_t)
    n = len(pairs)
    return sum(2.0 ** (i - n + 1) * _ab_pair(*pair, margin) / pair[1].shape[0] / 1000 * 3
               for i, pair in enumerate(pairs))


def _fsp_matrices(named_maps: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """For consecutive maps (bot, top): G[b, c_top, c_bot] = mean over space of top[b, c_top] · bot[b, c_bot]."""
    matrices = []
    for (name_bot, bot), (name_top, top) in zip(named_maps, named_maps[1:]):
        bot, top = _pool_to_smaller(name_bot, bot, name_top, top)
        matrices.append(torch.bmm(top.flatten(2), bot.flatten(2).transpose(1, 2)) / (top.shape[2] * top.shape[3]))
    return matrices


def _check_fsp_maps(pairs: list[_NamedPair]) -> None:
    """At least 2 positions; per position equal channel counts; one dtype and device along each sequence."""
    if len(pairs) < 2:
        raise ValueError("FSP needs sequences of at least 2 maps in g_s and g_t (it relates consecutive maps), "
                         f"got {len(pairs)}")
    for i, (name_s, s, name_t, t) in enumerate(pairs):
        _check_map_pair(name_s, s, name_t, t)
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"{name_s} has {s.shape[1]} channels but {name_t} has {t.shape[1]}; "
                             "FSP needs equal channel counts")
        if i:
            _checks.pair(pairs[i - 1][0], pairs[i - 1][1], name_s, s, same_shape=False)


def fsp_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Flow of solution procedure (Yim, Joo, Bae, Kim 2017), as RepDistiller's ``FSP``.

    For consecutive maps (bot, top) of each network, G = mean over space of top ⊗ bot
    (C_top × C_bot, the larger map pooled to the smaller first); loss = Σ_pairs mean (G_s − G_t)².
    Student and teacher maps need equal channel counts; their spatial sizes may differ.
    """
    pairs = _checks.named_pairs("g_s", g_s, "g_t", g_t)
    _check_fsp_maps(pairs)
    fsp_s = _fsp_matrices([(name_s, s) for name_s, s, _, _ in pairs])
    fsp_t = _fsp_matrices([(name_t, t) for _, _, name_t, t in pairs])
    return sum((m_s - m_t).pow(2).mean() for m_s, m_t in zip(fsp_s, fsp_t))


def vid_loss(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor,
             eps: float = 1e-5) -> torch.Tensor:
    """Variational information distillation (Ahn, Hu, Damianou, Lawrence, Dai 2019), as RepDistiller's ``VIDLoss``.

    σ²_c = softplus(log_scale_c) + eps;  loss = mean over B·C·H·W of ½((μ − t)²/σ²_c + log σ²_c).
    ``pred_mean`` is the regressed student map μ, of ``target``'s shape [B, C, H, W] (the module
    pools before regressing); ``log_scale`` is [C]. softplus is ``F.softplus``, which equals the
    published log(1 + exp(ℓ)) to rounding and stays finite where that overflows. ``eps`` > 0.
    """
    eps = _checks.number("eps", eps, positive=True)
    _checks.tensor("pred_mean", pred_mean, ndim=4)
    _checks.tensor("target", target, ndim=4)
    _checks.pair("pred_mean", pred_mean, "target", target)
    _checks.tensor("log_scale", log_scale, ndim=1)
    if log_scale.shape[0] != target.shape[1]:
        raise ValueError(f"log_scale has {log_scale.shape[0]} entries but target has {target.shape[1]} channels")
    if log_scale.device != target.device:
        raise ValueError(f"log_scale is on {log_scale.device} but target is on {target.device}")
    pred_var = (F.softplus(log_scale) + eps).view(1, -1, 1, 1)
    return (0.5 * ((pred_mean - target).pow(2) / pred_var + pred_var.log())).mean()
