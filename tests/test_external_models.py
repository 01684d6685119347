"""Bring your own models (issue 17) with torchvision and timm: teachers and students by name through the CLI,
default taps of their families, vision-transformer tokens as maps, CNN -> ViT and ViT -> CNN, DeiT's
distillation token, weights round-trips, and the refusals. Marker ``models``: ``bash scripts/dev test-models``
runs them in .venv-models (torch 2.14.1 + torchvision 0.29.1 + timm); elsewhere they are skipped. Every model
here is small (ViTs of depth 2 at 32x32 with 4x4 patches, the embedded digits)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fastkd import models
from fastkd.cli import main
from fastkd.train.checkpoint import load_checkpoint
from fastkd.train.distiller import Distiller
from fastkd.train.run import load_weights
from tests._helpers import cli_error

pytestmark = pytest.mark.models

VIT = "timm:vit_tiny_patch16_224"
VIT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2}
SMALL = ["student.kwargs.embed_dim=64", "student.kwargs.num_heads=2"]  # 64-wide blocks: a CLI run in seconds
VIT_OVERRIDES = [f"student.kwargs.{k}={v}" for k, v in VIT_KWARGS.items()]


def _vit(name=VIT, **kwargs):
    torch.manual_seed(0)
    return models.create(name, num_classes=10, **{**VIT_KWARGS, **kwargs})


def _shapes(features):
    return [tuple(f.shape) for f in features]


def test_a_vits_blocks_become_maps_and_its_class_token_the_pooled_feature():
    vit = _vit().eval()
    reader = models.FeatureReader(vit)
    assert reader.names == ["patch_embed", "blocks.0", "blocks.1", "head:input"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features, logits = reader(x)
        tokens = vit.blocks(vit._pos_embed(vit.patch_embed(x)))  # [B, 1 + 64, 192]: the class token first
        pooled = vit.forward_head(vit.forward_features(x), pre_logits=True)
    assert _shapes(features) == [(3, 192, 8, 8), (3, 192, 8, 8), (3, 192, 8, 8), (3, 192)]
    # patch (i, j) of the 8x8 grid is token 1 + 8i + j; the class token is taken apart
    assert torch.equal(features[2][:, :, 2, 5], tokens[:, 1 + 8 * 2 + 5])
    assert torch.allclose(features[-1], pooled) and torch.allclose(logits, vit(x))


TV_FAMILIES = {  # name: (kwargs, stem + stages + pooled shapes at 64x64)
    "tv:resnet18": ({}, [(2, 64, 16, 16), (2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2), (2, 512)]),
    "tv:mobilenet_v3_small": ({}, [(2, 16, 32, 32), (2, 16, 16, 16), (2, 24, 8, 8), (2, 48, 4, 4), (2, 576, 2, 2),
                                   (2, 1024)]),
    "tv:efficientnet_b0": ({}, [(2, 32, 32, 32), (2, 16, 32, 32), (2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4),
                                (2, 1280, 2, 2), (2, 1280)]),
    "tv:convnext_tiny": ({}, [(2, 96, 16, 16), (2, 96, 16, 16), (2, 192, 8, 8), (2, 384, 4, 4), (2, 768, 2, 2),
                              (2, 768)]),
    "tv:swin_t": ({}, [(2, 96, 16, 16), (2, 96, 16, 16), (2, 192, 8, 8), (2, 384, 4, 4), (2, 768, 2, 2), (2, 768)]),
    "tv:vit_b_16": ({"image_size": 64}, [(2, 768, 4, 4)] * 5 + [(2, 768)]),
    "timm:resnet18": ({}, [(2, 64, 16, 16), (2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2), (2, 512)]),
    "timm:convnext_atto": ({}, [(2, 40, 16, 16), (2, 40, 16, 16), (2, 80, 8, 8), (2, 160, 4, 4), (2, 320, 2, 2),
                                (2, 320)]),
    "timm:swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 1, 1),
                                           "num_heads": (1, 1, 1, 1)},
                                          [(2, 24, 16, 16), (2, 24, 16, 16), (2, 48, 8, 8), (2, 96, 4, 4),
                                           (2, 192, 2, 2), (2, 192)]),
    "timm:efficientnet_b0": ({}, [(2, 32, 32, 32), (2, 16, 32, 32), (2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4),
                                  (2, 320, 2, 2), (2, 1280)]),
}


@pytest.mark.parametrize("name", sorted(TV_FAMILIES))
def test_default_taps_of_torchvision_and_timm_families(name):
    kwargs, shapes = TV_FAMILIES[name]
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, **kwargs).eval()
    reader = models.FeatureReader(model)
    with torch.no_grad():
        features, logits = reader(torch.randn(2, 3, 64, 64))
    assert _shapes(features) == shapes, reader.names
    assert logits.shape == (2, 10)


LOSSES = "{ce: 1.0, kd: {weight: 1.0, temperature: 4.0}, srd: {weight: 1.0}, at: {weight: 100.0}, " \
         "sp: {weight: 100.0}, crd: {weight: 0.8, num_negatives: 64, feat_dim: 16}}"


def test_torchvision_teacher_to_timm_vit_student_through_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in models.create("tv:resnet18", num_classes=10).state_dict().items()}, teacher)
    run = tmp_path / "run"
    argv = ["distill", "digits", f"student.name={VIT}", *VIT_OVERRIDES, *SMALL, "teacher.name=tv:resnet18",
            f"teacher.weights={teacher}", f"losses={LOSSES}", "epochs=1", "data.batch_size=64", "--device", "cpu",
            "--output", str(run)]
    assert main(argv) == 0, capsys.readouterr().err
    record = [json.loads(line) for line in open(run / "metrics.jsonl")][-1]
    for name in ("ce", "kd", "srd", "at", "sp", "crd"):
        assert record[f"train_{name}"] == record[f"train_{name}"] and abs(record[f"train_{name}"]) < 1e6, name
    assert 0.0 <= record["test_top1"] <= 100.0
    # the run's student is the recipe's ViT: eval and export rebuild it from the run's config (its kwargs)
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    assert f"top-1 {record['test_top1']:.2f}" in capsys.readouterr().out
    assert main(["export", str(run)]) == 0
    info = json.load(open(run / "student.json"))
    assert info["model"] == VIT and info["kwargs"] == {**VIT_KWARGS, "embed_dim": 64, "num_heads": 2}


def test_the_cross_family_cifar_recipe_trains_on_the_digits(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = tmp_path / "resnet8.pt"
    torch.save({"model": models.create("resnet8", num_classes=10).state_dict()}, teacher)  # RepDistiller's layout
    run = tmp_path / "run"
    argv = ["distill", "cifar100_vit_srd", "data.name=digits", "teacher.name=resnet8", f"teacher.weights={teacher}",
            "student.kwargs.depth=2", "student.kwargs.embed_dim=64", "student.kwargs.num_heads=2", "epochs=2",
            "data.batch_size=32", "schedule.warmup_epochs=0", "--device", "cpu", "--output", str(run)]
    assert main(argv) == 0, capsys.readouterr().err
    state = load_checkpoint(run / "last.pt")
    assert state["recipe"]["student"]["kwargs"] == {"img_size": 32, "patch_size": 4, "drop_path_rate": 0.1,
                                                    "depth": 2, "embed_dim": 64, "num_heads": 2}
    assert state["losses"]["srd.projector.weight"].shape == (64, 64)  # the ViT's 64-d class token -> resnet8's 64
    first, last = state["history"]  # (the teacher is untrained: the student optimises its objective, no more)
    assert last["train_loss"] < first["train_loss"] and last["test_top1"] is not None, state["history"]


def test_vit_teacher_to_zoo_cnn_student_with_every_loss_that_fits():
    teacher, student = _vit(), models.create("resnet8", num_classes=10)
    losses = {"ce": 1.0, "kd": 0.9, "at": 1000.0, "sp": 3000.0, "hint": 100.0, "nst": 50.0, "vid": 1.0, "srd": 2.0,
              "rkd": 1.0, "pkt": 30000.0, "cc": 0.02, "cckd": 1.0, "crd": {"weight": 0.8, "num_negatives": 16,
                                                                           "feat_dim": 8}, "deit": 1.0}
    distiller = Distiller(student, teacher, losses, num_data=64)
    assert distiller.criteria["srd"].projector.weight.shape == (192, 64)
    distiller.train()
    total, parts, logits = distiller(torch.randn(8, 3, 32, 32), torch.arange(8) % 10, torch.arange(8))
    total.backward()
    assert set(parts) == set(losses) and all(torch.isfinite(v) for v in parts.values())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_a_loss_that_does_not_fit_the_pair_is_refused_at_build_time_with_the_shapes():
    student, teacher = _vit(), models.create("tv:resnet18", num_classes=10)
    with pytest.raises(ValueError) as refused:
        Distiller(student, teacher, {"ce": 1.0, "fsp": 1.0})
    assert str(refused.value) == (
        "loss 'fsp' cannot take what these models give (maps_s [4x192x8x8, 4x192x8x8, 4x192x8x8], maps_t "
        "[4x64x8x8, 4x128x4x4, 4x512x1x1]): g_s[0] has 192 channels but g_t[0] has 64; FSP needs equal channel counts")
    with pytest.raises(ValueError, match=r"no pre-activation taps are known for VisionTransformer .* name them with "
                                         r"student.taps / teacher.taps"):
        Distiller(student, teacher, {"ce": 1.0, "ab": 1.0})


def test_deits_distillation_token_learns_the_teachers_top_class():
    student = _vit("timm:deit_tiny_distilled_patch16_224")
    teacher = models.create("tv:resnet18", num_classes=10)
    distiller = Distiller(student, teacher, {"ce": 0.5, "deit": 0.5})
    distiller.train()
    x, target = torch.randn(6, 3, 32, 32), torch.arange(6) % 10
    total, parts, logits = distiller(x, target)
    parts = {name: value.detach() for name, value in parts.items()}
    with torch.no_grad():
        cls_logits, dist_logits = student(x)  # distilled training: both heads
        top = teacher(x).argmax(dim=1)
    assert torch.allclose(logits.detach(), cls_logits) and not torch.allclose(cls_logits, dist_logits)
    assert float(parts["ce"]) == pytest.approx(float(F.cross_entropy(cls_logits, target)), rel=1e-5)
    assert float(parts["deit"]) == pytest.approx(float(F.cross_entropy(dist_logits, top)), rel=1e-5)
    student.eval()
    with torch.no_grad():  # evaluation averages the two heads, as DeiT does
        assert torch.allclose(student(x), (cls_logits + dist_logits) / 2, atol=1e-6)


@pytest.mark.parametrize("layout", ["safetensors", "timm", "torchvision", "repdistiller"])
def test_weights_round_trip_by_path(layout, tmp_path):
    torch.manual_seed(123)
    source = models.create(VIT, num_classes=10, **VIT_KWARGS).eval()
    state = source.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif layout == "timm":  # timm's train.py: {'state_dict': ...}, here as saved from DDP
        torch.save({"epoch": 3, "arch": "vit_tiny", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "torchvision":  # torchvision's references/classification/train.py
        torch.save({"model": state, "optimizer": {}, "epoch": 3}, path)
    else:
        torch.save({"model": state}, path)
    loaded = _vit().eval()  # another initialisation
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(loaded(x), source(x))
        load_weights(loaded, str(path), VIT, "teacher", "weights")
        assert torch.equal(loaded(x), source(x))


def test_weights_of_another_model_are_refused_with_the_keys_that_differ(tmp_path, capsys):
    path = tmp_path / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in _vit(depth=3).state_dict().items()}, path)
    with pytest.raises(ValueError) as refused:
        load_weights(_vit(), str(path), VIT, "teacher", "weights")
    message = str(refused.value)
    assert "0 tensors differ in shape; 0 are missing; 12 are not the model's (blocks.2.attn.proj.bias, " in message
    assert "Is teacher.name right? (and teacher.kwargs: a timm model's img_size, depth, ...)" in message
    err = cli_error(capsys, ["distill", "digits", f"teacher.name={VIT}", *[o.replace("student", "teacher")
                                                                          for o in VIT_OVERRIDES],
                             f"teacher.weights={path}", "--output", str(tmp_path / "run"),
                             "losses={ce: 1, kd: 1}", "--device", "cpu"])
    assert f"teacher.weights {path} does not hold weights of a {VIT}" in err, err


def test_names_taps_and_downloads_are_checked(tmp_path, capsys):
    err = cli_error(capsys, ["distill", "cifar100_vit_srd", "student.name=timm:vit_tiny_patch4_32"])
    assert "student.name: unknown model 'timm:vit_tiny_patch4_32' in timm; did you mean" in err, err
    assert "`fastkd models 'timm:*'` lists the names" in err
    err = cli_error(capsys, ["distill", "cifar100_vit_srd", "student.kwargs.pretrained=true", "data.name=digits",
                             "teacher.weights=t.pt"])
    assert "pretrained would download weights; fastkd reads weights from a local file only" in err, err
    assert main(["models", "timm:deit_tiny*"]) == 0
    assert capsys.readouterr().out.split() == ["timm:deit_tiny_distilled_patch16_224", "timm:deit_tiny_patch16_224"]
    assert main(["models", "tv:resnet1*"]) == 0
    assert capsys.readouterr().out.split() == ["tv:resnet101", "tv:resnet152", "tv:resnet18"]
    with pytest.raises(ValueError, match=r"VisionTransformer has no module 'block.1' \(tap 'block.1'\); close matches: "
                                         r"blocks.1, blocks.0, blocks, blocks.1.mlp"):
        Distiller(_vit(), models.create("resnet8", num_classes=10), {"ce": 1.0, "at": 1.0},
                  student_taps=["patch_embed", "block.1", "head:input"])
