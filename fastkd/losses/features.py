"""Feature-map distillation modules and the trainable adapters RepDistiller pairs them with.

Losses: :class:`HintLoss`, :class:`ATLoss`, :class:`NSTLoss`, :class:`FTLoss`, :class:`ABLoss`,
:class:`FSPLoss`, :class:`VIDLoss` (formulas in :mod:`fastkd.functional.features`). Adapters, with
RepDistiller's layers and ``state_dict`` keys (models/util.py), so its checkpoints load:
:class:`ConvReg` (FitNet's regressor), :class:`Connector` (AB), :class:`Paraphraser` and
:class:`Translator` (FT).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastkd import _checks
from fastkd.functional.features import (_Maps, _check_map_pair, _pool_to_smaller, ab_loss, at_loss, fsp_loss,
                                        ft_loss, hint_loss, nst_loss, vid_loss)
from fastkd.losses._registry import InitStage, register

__all__ = ["HintLoss", "ConvReg", "Connector", "ATLoss", "NSTLoss", "FTLoss", "Paraphraser", "Translator", "ABLoss", "FSPLoss",
           "VIDLoss"]


def _shape(name: str, shape) -> tuple[int, int, int, int]:
    """A feature-map shape such as ``tensor.shape``: 4 positive ints (N, C, H, W)."""
    if isinstance(shape, torch.Tensor) or not isinstance(shape, Sequence) or len(shape) != 4 \
            or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{name} must be 4 positive ints (N, C, H, W), got {shape!r}")
    return tuple(shape)


def _check_input(name: str, x, channels: int, module: nn.Module) -> None:
    """A [B ≥ 1, C, H, W] input with the channel count the module was built for, on its device and dtype
    (checked before the module's layers run, so an empty batch never reaches a BatchNorm's statistics)."""
    _checks.tensor(name, x, ndim=4)
    _checks.nonempty(name, x)
    if x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels but this {type(module).__name__} expects {channels}")
    _checks.module_device(name, x, module)


def _with_regressor(cls, probe, **options) -> nn.ModuleDict:
    """FitNet: the loss and a :class:`ConvReg` from the student's hint map to the teacher's."""
    regressor = ConvReg(probe["hint_layer_s"].shape, probe["hint_layer_t"].shape)
    return nn.ModuleDict({"loss": cls(**options), "regressor": regressor})


def _through(adapter: str):
    """The call of a loss whose student input first goes through ``criterion[adapter]`` (FitNet, AB)."""
    def call(criterion: nn.ModuleDict, f_s, f_t) -> torch.Tensor:
        return criterion["loss"](criterion[adapter](f_s), f_t)
    return call


@register("hint", takes=("hint_layer_s", "hint_layer_t"), build=_with_regressor,
          call=_through("regressor"))
class HintLoss(nn.Module):
    """FitNet hints (Romero et al. 2015): mean((f_s − f_t)²); see :func:`fastkd.functional.hint_loss`."""

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return hint_loss(f_s, f_t)


class ConvReg(nn.Module):
    """FitNet's convolutional regressor from a student map of ``s_shape`` to a teacher map of ``t_shape``.

    conv, by the heights: H_s = 2H_t → Conv 3×3 stride 2 pad 1; 2H_s = H_t → ConvTranspose 4×4
    stride 2 pad 1; H_s ≥ H_t → Conv with kernel (1+H_s−H_t, 1+W_s−W_t); then BatchNorm2d(C_t) and,
    when ``use_relu``, ReLU. Keys: conv.weight, conv.bias, bn.* as RepDistiller's ``ConvReg``.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        _, s_c, s_h, s_w = _shape("s_shape", s_shape)
        _, t_c, t_h, t_w = _shape("t_shape", t_shape)
        self.use_relu = use_relu
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"ConvReg cannot map s_shape {tuple(s_shape)} to t_shape {tuple(t_shape)}: the student "
                             "map must be twice, half, or at least the teacher map's size")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        _check_input("f_s", f_s, self.conv.in_channels, self)
        x = self.bn(self.conv(f_s))
        return self.relu(x) if self.use_relu else x


class Connector(nn.Module):
    """AB's connectors from the student's maps to the teacher's, as RepDistiller's ``Connector``.

    Pair i: identity where the student map already has the teacher's channels and height, else a
    :class:`ConvReg` without ReLU (conv + BatchNorm2d), so the output can be negative like the
    teacher's pre-activation map. ``forward(g_s)`` maps a sequence of student maps.
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(s_shapes) != len(t_shapes) or not s_shapes:
            raise ValueError(f"s_shapes and t_shapes must be non-empty and of equal length, got "
                             f"{len(s_shapes)} and {len(t_shapes)}")
        pairs = [(_shape(f"s_shapes[{i}]", s), _shape(f"t_shapes[{i}]", t)) for i, (s, t) in
                 enumerate(zip(s_shapes, t_shapes))]
        self.connectors = nn.ModuleList(
            nn.Sequential() if s[1:3] == t[1:3] else ConvReg(s, t, use_relu=False) for s, t in pairs)

    def forward(self, g_s: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(g_s, torch.Tensor) or len(g_s) != len(self.connectors):
            raise ValueError(f"g_s must be a sequence of {len(self.connectors)} maps, got "
                             f"{type(g_s).__name__ if isinstance(g_s, torch.Tensor) else len(g_s)}")
        return [connector(g) for connector, g in zip(self.connectors, g_s)]


@register("at", takes=("blocks_s", "blocks_t"))
class ATLoss(nn.Module):
    """Attention transfer (Zagoruyko, Komodakis 2017); see :func:`fastkd.functional.at_loss`.

    ``forward(f_s, f_t)`` takes one pair of maps or two equal-length sequences (summed).
    """

    def __init__(self, p: float = 2) -> None:
        super().__init__()
        self.p = _checks.number("p", p, positive=True)

    def forward(self, f_s: _Maps, f_t: _Maps) -> torch.Tensor:
        return at_loss(f_s, f_t, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@register("nst", takes=("blocks_s", "blocks_t"))
class NSTLoss(nn.Module):
    """Neuron selectivity transfer (Huang, Wang 2017); see :func:`fastkd.functional.nst_loss`.

    ``forward(f_s, f_t)`` takes one pair of maps or two equal-length sequences (summed).
    """

    def forward(self, f_s: _Maps, f_t: _Maps) -> torch.Tensor:
        return nst_loss(f_s, f_t)


def _with_factors(cls, probe, **options) -> nn.ModuleDict:
    """FT: the loss, the teacher's :class:`Paraphraser` and the student's :class:`Translator` of the last maps."""
    f_s, f_t = probe["last_block_s"], probe["last_block_t"]
    return nn.ModuleDict({"loss": cls(**options), "paraphraser": Paraphraser(f_t.shape),
                          "translator": Translator(f_s.shape, f_t.shape)})


def _factor_transfer(criterion: nn.ModuleDict, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """The translated student map against the (frozen) paraphraser's factor of the teacher's."""
    with torch.no_grad():
        factor_t = criterion["paraphraser"](f_t, is_factor=True)
    return criterion["loss"](criterion["translator"](f_s), factor_t)


def _paraphraser_reconstruction(criterion: nn.ModuleDict, f_t: torch.Tensor) -> torch.Tensor:
    """FT's initialisation: the paraphraser as an autoencoder of the teacher map (MSE)."""
    _, rebuilt = criterion["paraphraser"](f_t)
    return F.mse_loss(rebuilt.float(), f_t.float())


@register("ft", takes=("last_block_s", "last_block_t"), build=_with_factors, call=_factor_transfer,
          init=InitStage(modules=lambda criterion: [criterion["paraphraser"]], loss=_paraphraser_reconstruction,
                         takes=("last_block_t",), frozen=True))
class FTLoss(nn.Module):
    """Factor transfer (Kim, Park, Kwak 2018); see :func:`fastkd.functional.ft_loss`.

    ``forward(factor_s, factor_t)``: the :class:`Translator`'s output and the :class:`Paraphraser`'s factor.
    """

    def __init__(self, p1: float = 2, p2: float = 1) -> None:
        super().__init__()
        self.p1 = _checks.number("p1", p1, positive=True)
        self.p2 = _checks.number("p2", p2, positive=True)

    def forward(self, factor_s: torch.Tensor, factor_t: torch.Tensor) -> torch.Tensor:
        return ft_loss(factor_s, factor_t, self.p1, self.p2)

    def extra_repr(self) -> str:
        return f"p1={self.p1}, p2={self.p2}"


def _factor_channels(c_t: int, k: float) -> int:
    """int(C_t·k), FT's factor channels; at least 1."""
    channels = int(c_t * _checks.number("k", k, positive=True))
    if channels < 1:
        raise ValueError(f"k = {k} gives int({c_t}·k) = {channels} factor channels; it must be at least 1")
    return channels


def _conv_stack(conv: type[nn.Module], channels: Sequence[int], use_bn: bool) -> nn.Sequential:
    """(conv 3×3 pad 1, BatchNorm2d or an empty placeholder, LeakyReLU(0.1)) for each step of ``channels``.

    The placeholder keeps the layer indices (and so the state_dict keys) of RepDistiller's FT modules.
    """
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out) if use_bn else nn.Sequential(),
                   nn.LeakyReLU(0.1, inplace=True)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """FT's paraphraser (Kim, Park, Kwak 2018): an autoencoder of the teacher map, as RepDistiller's.

    encoder: conv C_t→C_t, C_t→C_f, C_f→C_f; decoder: transposed conv C_f→C_f, C_f→C_t, C_t→C_t;
    C_f = int(C_t·k). ``forward(f, is_factor=False)`` returns the factor when ``is_factor``, else
    (factor, reconstruction).
    """

    def __init__(self, t_shape: Sequence[int], k: float = 0.5, use_bn: bool = False) -> None:
        super().__init__()
        _, c_t, _, _ = _shape("t_shape", t_shape)
        c_f = _factor_channels(c_t, k)
        self.encoder = _conv_stack(nn.Conv2d, (c_t, c_t, c_f, c_f), use_bn)
        self.decoder = _conv_stack(nn.ConvTranspose2d, (c_f, c_f, c_t, c_t), use_bn)

    def forward(self, f: torch.Tensor, is_factor: bool = False):
        _check_input("f", f, self.encoder[0].in_channels, self)
        factor = self.encoder(f)
        if is_factor:
            return factor
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """FT's translator (Kim, Park, Kwak 2018): the student map to a factor of int(C_t·k) channels.

    encoder: conv C_s→C_s, C_s→C_f, C_f→C_f, as RepDistiller's ``Translator``.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], k: float = 0.5, use_bn: bool = True) -> None:
        super().__init__()
        _, c_s, _, _ = _shape("s_shape", s_shape)
        c_f = _factor_channels(_shape("t_shape", t_shape)[1], k)
        self.encoder = _conv_stack(nn.Conv2d, (c_s, c_s, c_f, c_f), use_bn)

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        _check_input("f_s", f_s, self.encoder[0].in_channels, self)
        return self.encoder(f_s)


def _with_connector(cls, probe, **options) -> nn.ModuleDict:
    """AB: the loss and a :class:`Connector` from the student's stage maps to the teacher's."""
    return nn.ModuleDict({"loss": cls(**options), "connector": Connector(
        [f.shape for f in probe["blocks_s"]], [f.shape for f in probe["blocks_t"]])})


@register("ab", takes=("blocks_s", "blocks_t"), preact=True, build=_with_connector, call=_through("connector"),
          init=InitStage(modules=lambda criterion: [criterion["connector"]], student=True))
class ABLoss(nn.Module):
    """Activation boundaries (Heo, Lee, Yun, Choi 2019); see :func:`fastkd.functional.ab_loss`.

    ``forward(g_s, g_t)``: one pair or two equal-length sequences of pre-activation maps; the
    weights 2^(i−n+1) follow the number n of pairs given (RepDistiller's ``feat_num``).
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = _checks.number("margin", margin, nonnegative=True)

    def forward(self, g_s: _Maps, g_t: _Maps) -> torch.Tensor:
        return ab_loss(g_s, g_t, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


@register("fsp", takes=("maps_s", "maps_t"), init=InitStage(student=True))
class FSPLoss(nn.Module):
    """Flow of solution procedure (Yim, Joo, Bae, Kim 2017); see :func:`fastkd.functional.fsp_loss`.

    ``forward(g_s, g_t)``: two equal-length sequences of at least 2 maps each.
    """

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> torch.Tensor:
        return fsp_loss(g_s, g_t)


def _per_block(cls, probe, **options) -> nn.ModuleList:
    """VID: one loss per pair of stage maps, C_in = C_mid = the student's channels, C_t the teacher's."""
    return nn.ModuleList([cls(s.shape[1], s.shape[1], t.shape[1], **options)
                          for s, t in zip(probe["blocks_s"], probe["blocks_t"])])


def _summed_per_block(criterion: nn.ModuleList, f_s, f_t) -> torch.Tensor:
    return sum(vid(s, t) for vid, s, t in zip(criterion, f_s, f_t))


@register("vid", takes=("blocks_s", "blocks_t"), build=_per_block, call=_summed_per_block,
          derived=("num_input_channels", "num_mid_channel", "num_target_channels"))
class VIDLoss(nn.Module):
    """Variational information distillation (Ahn, Hu, Damianou, Lawrence, Dai 2019), as RepDistiller's.

    μ = ``regressor``(input): conv1×1 (no bias) C_in→C_mid, ReLU, C_mid→C_mid, ReLU, C_mid→C_t;
    σ² = softplus(``log_scale``) + eps per target channel, ``log_scale`` initialised so σ² =
    init_pred_var; loss = mean ½((μ − target)²/σ² + log σ²) (:func:`fastkd.functional.vid_loss`),
    after pooling the larger of input and target to the other's size.
    """

    def __init__(self, num_input_channels: int, num_mid_channel: int, num_target_channels: int,
                 init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        eps = _checks.number("eps", eps, positive=True)
        if not _checks.number("init_pred_var", init_pred_var) > eps:
            raise ValueError(f"init_pred_var ({init_pred_var}) must exceed eps ({eps})")
        self.regressor = nn.Sequential(
            nn.Conv2d(num_input_channels, num_mid_channel, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(num_mid_channel, num_mid_channel, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(num_mid_channel, num_target_channels, kernel_size=1, bias=False),
        )
        inverse_softplus = math.log(math.exp(init_pred_var - eps) - 1.0)
        self.log_scale = nn.Parameter(inverse_softplus * torch.ones(num_target_channels))
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_input("input", input, self.regressor[0].in_channels, self)
        _check_input("target", target, self.log_scale.shape[0], self)
        _check_map_pair("input", input, "target", target)
        input, target = _pool_to_smaller("input", input, "target", target)
        return vid_loss(self.regressor(input), target, self.log_scale, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
