"""Multi-branch CIFAR ResNets for online distillation (ONE, OKDDip, multi-branch diversity enhancement).

The layout of ONE (Lan, Zhu, Gong, "Knowledge Distillation by On-the-Fly Native Ensemble",
NeurIPS 2018) and its re-implementation in DefangChen/OKDDip: a RepDistiller CIFAR ResNet whose
stem (conv1), ``layer1`` and ``layer2`` are shared, and ``m`` branches, each its own ``layer3``
and classifier. ``resnet32_mb3`` is a ResNet-32 with three branches.

How the branches' logits z_1..z_m form the ensemble z_e = Σ_i w_i z_i is the ``aggregation``:

- ``"mean"``: w_i = 1/m (plain averaging; OKDDip's peers, or branches trained with CE alone;
  with m = 1 the model is a plain CIFAR ResNet with global average pooling);
- ``"gate"``: ONE's gate on the shared feature, w = softmax(ReLU(BN(FC(avgpool(f_shared)))));
- ``"ffm"``: the Feature Fusion Module of multi-branch diversity enhancement (Li et al., ACCV
  2020), :class:`FeatureFusion`, on the branches' pooled last-block features.

``forward(x)`` returns the ensemble logits (what the engine evaluates); ``forward(x, branches=True)``
returns a :class:`BranchOutput` with everything the online losses need; ``forward(x, is_feat=True)``
keeps RepDistiller's convention with the shared stages' outputs and the branch-averaged last
stage and pooled feature, so the model can also be a student of an offline distiller.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastkd._checks import integer
from fastkd.models._blocks import Stage, init_weights, run_stages
from fastkd.models.resnet import BasicBlock

AGGREGATIONS = ("mean", "gate", "ffm")


class BranchOutput(NamedTuple):
    """What one forward pass of a :class:`MultiBranchResNet` hands to the online losses.

    ``shared``: the shared trunk's output [B, C2, H, W]; ``features``: each branch's last-block
    output (m tensors [B, C3, h, w]); ``pooled``: [m, B, C3]; ``logits``: [m, B, K];
    ``weights``: the ensemble weights [B, m]; ``ensemble``: Σ_i w_i z_i, [B, K].
    """

    shared: torch.Tensor
    features: list[torch.Tensor]
    pooled: torch.Tensor
    logits: torch.Tensor
    weights: torch.Tensor
    ensemble: torch.Tensor


class FeatureFusion(nn.Module):
    """The Feature Fusion Module of multi-branch diversity enhancement: branch features → ensemble weights.

    w = softmax(ReLU(BN₂(FC₂(ReLU(BN₁(FC₁([h_1; …; h_m]))))))) over the m branches, where h_i is
    branch i's pooled last-block feature, [h_1; …; h_m] their concatenation [B, m·C] (read without
    gradient: the module learns to weigh the branches, it does not reshape their features),
    FC₁: m·C → C, FC₂: C → m. The paper (Li, Li, Zhang, Zhang, Ren, "Online Knowledge Distillation
    via Multi-branch Diversity Enhancement", ACCV 2020) says the module fuses the branches'
    last-block features into the attention weights of the ensemble teacher but publishes neither
    code nor its layers: **these layers are our design**. Its output end mirrors ONE's gate
    (BN + ReLU before the softmax bounds how peaked the weights get); a first design without that
    end and with the gradient flowing into the branches trained worse (digits, ResNet-20, 4 epochs,
    3 seeds: 86.4% ensemble top-1 against 92.8% for this one; ``benchmarks/online_accuracy.py``).
    """

    def __init__(self, channels: int, num_branches: int):
        super().__init__()
        self.fc1 = nn.Linear(channels * num_branches, channels)
        self.bn1 = nn.BatchNorm1d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(channels, num_branches)
        self.bn2 = nn.BatchNorm1d(num_branches)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled``: [m, B, C] → weights [B, m] (each row sums to 1)."""
        fused = pooled.detach().transpose(0, 1).flatten(1)
        hidden = self.relu(self.bn1(self.fc1(fused)))
        return self.relu(self.bn2(self.fc2(hidden))).softmax(dim=1)


class Gate(nn.Module):
    """ONE's gate: w = softmax(ReLU(BN(FC(avgpool(f_shared))))) over the m branches."""

    def __init__(self, channels: int, num_branches: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.fc(shared.mean(dim=(2, 3))))).softmax(dim=1)


class MultiBranchResNet(nn.Module):
    """A CIFAR ResNet of depth ``6n+2`` with a shared stem + ``layer1`` + ``layer2`` and ``num_branches``
    branches (``branches[i].layer3``, ``branches[i].fc``); see the module docstring."""

    def __init__(self, depth: int = 32, widths: tuple[int, ...] = (16, 16, 32, 64), num_branches: int = 3,
                 num_classes: int = 100, aggregation: str = "ffm"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        self.num_branches = integer("num_branches", num_branches, 1)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = _stage(widths[1], widths[2], blocks, stride=2)
        self.branches = nn.ModuleList(
            nn.ModuleDict({"layer3": _stage(widths[2], widths[3], blocks, stride=2),
                           "fc": nn.Linear(widths[3], num_classes)}) for _ in range(num_branches))
        if aggregation == "gate":
            self.gate = Gate(widths[2], num_branches)
        elif aggregation == "ffm":
            self.fusion = FeatureFusion(widths[3], num_branches)
        init_weights(self)

    def classifiers(self) -> list[nn.Linear]:
        """The branch classifiers (the Classifier Diversification loss takes their weights)."""
        return [branch["fc"] for branch in self.branches]

    def _trunk(self, x: torch.Tensor, preact: bool):
        x = self.relu(self.bn1(self.conv1(x)))
        shared, outs, pres = run_stages((self.layer1, self.layer2), x, preact)
        return x, shared, outs, pres

    def _branches(self, shared: torch.Tensor, preact: bool = False):
        features, pres, pooled, logits = [], [], [], []
        for branch in self.branches:
            if preact:
                out, pre = branch["layer3"](shared, return_preact=True)
                pres.append(pre)
            else:
                out = branch["layer3"](shared)
            h = out.mean(dim=(2, 3))
            features.append(out)
            pooled.append(h)
            logits.append(branch["fc"](h))
        return features, pres, torch.stack(pooled), torch.stack(logits)

    def _weights(self, shared: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        if self.aggregation == "gate":
            return self.gate(shared)
        if self.aggregation == "ffm":
            return self.fusion(pooled)
        return pooled.new_full((pooled.shape[1], self.num_branches), 1.0 / self.num_branches)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False, branches: bool = False):
        stem, shared, outs, pres = self._trunk(x, is_feat and preact)
        features, branch_pres, pooled, logits = self._branches(shared, is_feat and preact)
        weights = self._weights(shared, pooled)
        ensemble = torch.einsum("bm,mbk->bk", weights.to(logits.dtype), logits)
        if branches:
            return BranchOutput(shared, features, pooled, logits, weights, ensemble)
        if not is_feat:
            return ensemble
        last = torch.stack(branch_pres if preact else features).mean(dim=0)
        return [stem, *(pres if preact else outs), last, pooled.mean(dim=0)], ensemble


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> Stage:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes))
    rest = (BasicBlock(planes, planes) for _ in range(1, blocks))
    return Stage(BasicBlock(inplanes, planes, stride, downsample), *rest)


def _builder(depth: int, num_branches: int, aggregation: str):
    def build(num_classes: int = 100, **kwargs) -> MultiBranchResNet:
        return MultiBranchResNet(depth, num_branches=num_branches, num_classes=num_classes,
                                 aggregation=kwargs.pop("aggregation", aggregation), **kwargs)

    build.__name__ = f"resnet{depth}_{aggregation}{num_branches}"
    return build


# zoo names: resnet32_mb3 / _mb4 (FFM: multi-branch diversity enhancement), resnet32_one3 / _one4
# (ONE's gate), resnet32_avg3 / _avg4 (plain mean: OKDDip, or branches trained alone); the resnet8_*
# twins are for quick runs. Other depths: MultiBranchResNet(depth, num_branches=m, aggregation=...).
MULTIBRANCH_MODELS = {
    f"resnet{depth}_{tag}{m}": _builder(depth, m, aggregation)
    for depth in (8, 32) for tag, aggregation in (("mb", "ffm"), ("one", "gate"), ("avg", "mean"))
    for m in (3, 4)
}
