"""Linear probing: how linearly separable a frozen network's features make the classes.

The CRD paper evaluates its cross-modal students this way (a linear classifier trained on the frozen
student's features, top-1 on the test set), since a student distilled from a teacher of another modality
without labels has no classifier of its own. :func:`linear_probe`:

1. features: the network in eval mode, no gradient; for each training and test image (un-augmented) the
   feature ``features[layer]`` of RepDistiller's ``is_feat`` list (or feature taps), averaged over space when
   it is a map — ``layer=-1`` is the pooled penultimate feature, ``-2`` the last stage's map pooled;
2. standardisation: ``z = (f − μ) / σ`` with the training features' per-dimension mean and standard deviation
   (σ floored at 1e-6);
3. a linear classifier ``W z + b`` fitted to the training features by full-batch Adam (lr 0.01, ``epochs``
   steps from zero weights) on the mean cross entropy plus ``weight_decay · ‖W‖²/2`` — a convex problem, so
   the result depends on the features, not on a seed;
4. top-1 of ``argmax(W z + b)`` on the test features (and on the training features, to read over-fitting).

``fastkd probe RUN_DIR`` runs it on a run's student and writes ``probe.json`` into the run folder.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.train.distiller import feature_function


@torch.no_grad()
def pooled_features(model: nn.Module, batches, layer: int = -1, device: str | torch.device = "cpu",
                    taps=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features ``[N, D]`` float32, labels ``[N]``) of ``model`` over ``batches`` of ``(images, labels, ...)``:
    ``features[layer]`` of the network's feature list, spatially averaged when it is a map."""
    was = model.training
    model.eval()
    read = feature_function(model, taps)
    feats, labels = [], []
    try:
        for images, target, *_ in batches:
            features, _ = read(images.to(device))
            if not -len(features) <= layer < len(features):
                raise ValueError(f"layer={layer}: the network gives {len(features)} features "
                                 f"(valid: {-len(features)} .. {len(features) - 1}; -1 is the pooled feature)")
            f = features[layer].float()
            feats.append((f.mean(dim=tuple(range(2, f.dim()))) if f.dim() > 2 else f.flatten(1)).cpu())
            labels.append(target.cpu())
    finally:
        model.train(was)
    return torch.cat(feats), torch.cat(labels)


def fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int = 300,
               lr: float = 0.01, weight_decay: float = 1e-4) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """The classifier of steps 2-3 of the module doc: (linear layer, μ, σ) — classify ``(x − μ) / σ``."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if train_x.dim() != 2 or train_y.shape != train_x.shape[:1]:
        raise ValueError(f"train_x must be [N, D] and train_y [N], got {tuple(train_x.shape)} and {tuple(train_y.shape)}")
    x = train_x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = ((x - mean) / std).float()
    head = nn.Linear(z.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(z), train_y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    return head, mean.float(), std.float()


def top1(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 (%) of the probe on features ``x`` with labels ``y``."""
    with torch.no_grad():
        return 100.0 * float((head((x.float() - mean) / std).argmax(1) == y).float().mean())


def linear_probe(model: nn.Module, train_batches, test_batches, num_classes: int, layer: int = -1,
                 epochs: int = 300, device: str | torch.device = "cpu") -> dict:
    """Steps 1-4 of the module doc: ``{"top1", "train_top1", "layer", "epochs", "dim", "train", "test"}``."""
    train_x, train_y = pooled_features(model, train_batches, layer, device)
    test_x, test_y = pooled_features(model, test_batches, layer, device)
    head, mean, std = fit_linear(train_x, train_y, num_classes, epochs)
    return {"top1": top1(head, mean, std, test_x, test_y), "train_top1": top1(head, mean, std, train_x, train_y),
            "layer": layer, "epochs": epochs, "dim": int(train_x.shape[1]), "train": int(train_x.shape[0]),
            "test": int(test_x.shape[0])}


def probe_run(run_dir: str, epochs: int = 300, layer: int = -1, which: str = "last",
              device: str | torch.device | None = None) -> dict:
    """Linear probe of a run folder's student (its ``last.pt`` or ``best.pt``) on the run's data: the training
    split un-augmented, the test split; the result is also written to ``RUN_DIR/probe.json``."""
    from fastkd.data.device import DeviceLoader
    from fastkd.train.recipe import load_recipe
    from fastkd.train.run import loaders, trained_student, training_device
    from fastkd.train.rundir import BEST, LAST

    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise ValueError(f"{run_dir!r} is not a run folder (no config.yaml): give the folder a run wrote")
    weights = os.path.join(run_dir, BEST if which == "best" else LAST)
    if not os.path.isfile(weights):
        raise ValueError(f"{weights} does not exist: the run has not finished an epoch (or use --from last)")
    recipe = load_recipe(run_dir)
    device = training_device(device)
    train, test, classes, _ = loaders(recipe, device, None)
    if not isinstance(train, DeviceLoader):
        raise ValueError("fastkd probe reads data held in memory (digits, CIFAR, data.in_memory=true image trees)")
    plain = DeviceLoader(train.dataset, max(recipe.data.batch_size, 256), shuffle=False, augment=False,
                         channels=train.channels, inputs=train.inputs)
    model = trained_student(recipe, recipe.student.name, weights, len(classes), test).to(device)
    result = {"run": os.path.abspath(run_dir), "weights": os.path.basename(weights), "student": recipe.student.name,
              "view": recipe.data.view, **linear_probe(model, plain, test, len(classes), layer, epochs, device)}
    with open(os.path.join(run_dir, "probe.json"), "w") as stream:
        json.dump(result, stream, indent=1)
    return result
