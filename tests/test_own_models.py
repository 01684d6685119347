"""Bring your own models (issue 17), the parts that need neither torchvision nor timm: the Distiller without a
probe batch or dataset size, the Trainer with a plain optimiser, model names checked before the data, weights
from any file with a report of what does not fit, losses refused when the objective is built, wrong taps, and
the extras named when they are missing. tests/test_external_models.py holds the torchvision / timm ones."""
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import fastkd
from fastkd import models
from fastkd.cli import main
from fastkd.models.sources import EXTRA, split
from fastkd.train.distiller import Distiller, paired
from fastkd.train.engine import Trainer
from fastkd.train.run import load_weights
from tests._helpers import cli_error

from test_engine import Loader, data


def _have(package):
    try:
        __import__(package)
    except Exception:  # noqa: BLE001 - a broken torchvision raises RuntimeError
        return False
    return True


def test_distiller_without_a_probe_batch_or_dataset_size():
    torch.manual_seed(0)
    student, teacher = models.create("resnet8", num_classes=10), models.create("resnet20", num_classes=10)
    distiller = Distiller(student, teacher, {"ce": 0.1, "kd": 0.9, "srd": {"weight": 2.0}})
    assert distiller.weights == {"ce": 0.1, "kd": 0.9, "srd": 2.0}
    assert distiller.criteria["srd"].projector.in_features == 64  # probed on 32x32 zeros: the CIFAR zoo's size
    images, target = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    total, parts, logits = distiller(images, target)
    total, parts = total.detach(), {k: v.detach() for k, v in parts.items()}
    with torch.no_grad():
        expected_kd = fastkd.functional.kd_loss(student(images), teacher(images), 4.0)
    assert float(parts["kd"]) == pytest.approx(float(expected_kd), rel=1e-5)
    assert float(total) == pytest.approx(0.1 * float(parts["ce"]) + 0.9 * float(parts["kd"]) + 2 * float(parts["srd"]),
                                         rel=1e-5)


def test_a_loss_with_a_bank_per_sample_needs_the_dataset_size():
    student, teacher = models.create("resnet8", num_classes=10), models.create("resnet20", num_classes=10)
    with pytest.raises(ValueError, match=r"\['crd'\] keep a memory bank per training sample: give num_data="):
        Distiller(student, teacher, {"ce": 1.0, "crd": 0.8})
    with pytest.raises(ValueError, match=r"losses\['kd'\] must be a weight or a mapping with a 'weight'"):
        Distiller(student, teacher, {"kd": {"temperature": 4.0}})


def test_a_loss_that_cannot_take_the_features_is_refused_at_build_time_with_their_shapes():
    student, teacher = models.create("resnet8", num_classes=10), models.create("resnet32x4", num_classes=10)
    with pytest.raises(ValueError) as refused:
        Distiller(student, teacher, {"ce": 1.0, "fsp": 1.0})
    message = str(refused.value)
    assert message == ("loss 'fsp' cannot take what these models give (maps_s [4x16x32x32, 4x16x32x32, 4x32x16x16, "
                       "4x64x8x8], maps_t [4x32x32x32, 4x64x32x32, 4x128x16x16, 4x256x8x8]): g_s[0] has 16 channels but "
                       "g_t[0] has 32; FSP needs equal channel counts"), message
    # the probe left no trace: a loss that builds fine has its initial state (BatchNorm statistics untouched)
    distiller = Distiller(student, teacher, {"ce": 1.0, "srd": 1.0})
    assert torch.equal(distiller.criteria["srd"].bn_t.running_mean, torch.zeros(256))
    assert int(distiller.criteria["srd"].bn_t.num_batches_tracked) == 0


def test_stage_lists_of_different_lengths_meet_at_the_shorter_ones():
    maps = list("abcd")
    assert paired(maps, 2) == ["b", "d"] and paired(maps, 4) == maps and paired(maps, 1) == ["d"]
    assert paired(list("abc"), 2) == ["a", "c"] and paired(list("abcdefghijkl"), 4) == ["c", "f", "i", "l"]


def _plain_trainer(tmp_path, optimizer_of, schedule=None, epochs=2):
    torch.manual_seed(0)
    images, labels = data()
    distiller = Distiller(models.create("resnet8", num_classes=10), models.create("resnet14", num_classes=10),
                          {"ce": 1.0, "kd": 0.9, "srd": 1.0}, images[:8])
    return Trainer(distiller, Loader(images, labels, 32), Loader(images, labels, 48, shuffle=False),
                   optimizer=optimizer_of(distiller), schedule=schedule, epochs=epochs, output=str(tmp_path))


def test_trainer_with_a_plain_optimiser_schedule_and_epoch_count(tmp_path):
    trainer = _plain_trainer(tmp_path, lambda d: torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9),
                             schedule=lambda epoch: 0.5 ** epoch)
    before = [p.detach().clone() for p in trainer.distiller.criteria.parameters()]
    history = trainer.fit(log=None)
    assert [r["epoch"] for r in history] == [1, 2]
    # the schedule's factor of the initial lr, set at every step: the last step of epoch 2 is at epoch 1 + 2/3
    assert history[-1]["lr"] == pytest.approx(0.1 * 0.5 ** (1 + 2 / 3))
    assert all(r["test_top1"] is not None for r in history)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.distiller.criteria.parameters()))  # SRD's projector
    assert os.path.isfile(tmp_path / "last.pt") and trainer.recipe.epochs == 2 and trainer.recipe.optim.lr == 0.1


def test_trainer_takes_a_torch_lr_scheduler_and_resumes_it(tmp_path):
    def optimizer(d):
        return torch.optim.AdamW(d.trainable_parameters(), lr=1e-3)

    trainer = _plain_trainer(tmp_path, optimizer, epochs=2)
    trainer.schedule = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.1)
    history = trainer.fit(log=None)
    assert [r["lr"] for r in history] == pytest.approx([1e-3, 1e-4])
    assert trainer.state_dict()["schedule"]["last_epoch"] == 2


def test_trainer_refuses_an_optimiser_that_leaves_out_the_losses_parameters(tmp_path):
    with pytest.raises(ValueError, match=r"the optimizer leaves out 2 trainable parameter tensors of the distiller .* "
                                         r"build it over distiller.trainable_parameters\(\)"):
        _plain_trainer(tmp_path, lambda d: torch.optim.SGD(d.student.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"needs epochs= \(an int >= 1\), got None"):
        _plain_trainer(tmp_path, lambda d: torch.optim.SGD(d.trainable_parameters(), lr=0.1), epochs=None)


def test_model_names_by_source():
    assert split("resnet8") == ("zoo", "resnet8") and split("tv:resnet50") == ("tv", "resnet50")
    assert split("timm:deit_tiny_patch16_224") == ("timm", "deit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"the prefix must be one of tv:, timm:"):
        split("hub:resnet50")
    with pytest.raises(ValueError, match=r"unknown model 'resnet8y' in fastkd's zoo; did you mean 'resnet8'"):
        models.check("resnet8y")
    with pytest.raises(ValueError, match=r"pretrained would download weights; fastkd reads weights from a local file"):
        models.create("timm:resnet18", num_classes=10, pretrained=True)


def test_an_unknown_model_is_refused_before_any_data_is_loaded(capsys, tmp_path):
    # cifar100 without a data.root would be refused for the data: the model name is checked first
    err = cli_error(capsys, ["distill", "cifar100_kd", "student.name=resnet8y", "--output", str(tmp_path / "r")])
    assert "student.name: unknown model 'resnet8y' in fastkd's zoo; did you mean 'resnet8'" in err, err
    assert "fastkd models" in err
    err = cli_error(capsys, ["distill", "cifar100_kd", "teacher.name=vit_tiny", "teacher.checkpoint=t.pt"])
    assert "teacher.name: unknown model 'vit_tiny'" in err and "tv:resnet50, timm:vit_tiny_patch16_224" in err, err
    err = cli_error(capsys, ["distill", "digits", "student.checkpoint=a.pt", "student.weights=b.pt"])
    assert "student.checkpoint and student.weights both name a file of weights: give one" in err, err


@pytest.mark.skipif(_have("timm") and _have("torchvision"), reason="checks the message of an environment without them")
def test_a_missing_extra_is_named_with_the_command_that_installs_it(capsys):
    err = cli_error(capsys, ["distill", "digits", "student.name=timm:vit_tiny_patch16_224"])
    assert "student.name: timm:" in err and EXTRA in err, err
    assert main(["models", "resnet*"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [n for n in models.names() if n.startswith("resnet")]
    assert EXTRA in captured.err


def test_fastkd_models_lists_what_can_be_created(capsys):
    assert main(["models", "wrn_*"]) == 0
    assert capsys.readouterr().out.split() == ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
    assert main(["models", "no_such_model*"]) == 1
    assert "no model name matches 'no_such_model*'" in capsys.readouterr().err


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_weights_from_any_file_round_trip_and_a_misfit_is_reported(tmp_path):
    torch.manual_seed(0)
    source = models.create("resnet8", num_classes=10)
    state = source.state_dict()
    x = torch.randn(4, 3, 32, 32)
    files = {"plain.pt": state, "repdistiller.pth": {"model": state, "epoch": 240},
             "ddp.pth": {"state_dict": {f"module.{k}": v for k, v in state.items()}}}
    for name, payload in files.items():
        torch.save(payload, tmp_path / name)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in (*files, "w.safetensors"):
        model = models.create("resnet8", num_classes=10)
        load_weights(model, str(tmp_path / name), "resnet8", "teacher", "weights")
        assert torch.equal(_logits(model, x), _logits(source, x)), name
    with pytest.raises(ValueError) as misfit:
        load_weights(models.create("resnet14", num_classes=10), str(tmp_path / "plain.pt"), "resnet14", "teacher",
                     "weights")
    message = str(misfit.value)
    assert message.startswith(f"teacher.weights {tmp_path / 'plain.pt'} does not hold weights of a resnet14: "
                              "0 tensors differ in shape; 36 are missing (layer1.1.bn1.bias, layer1.1.bn1.num_batches_tracked, "
                              "layer1.1.bn1.running_mean, layer1.1.bn1.running_var, … (32 more)); "), message
    assert "0 are not the model's. Is teacher.name right? (and teacher.kwargs" in message


def test_a_wrong_tap_lists_the_module_names_that_exist(capsys, tmp_path):
    student, teacher = models.create("resnet8", num_classes=10), models.create("resnet20", num_classes=10)
    with pytest.raises(ValueError, match=r"ResNet has no module 'layer9' \(tap 'layer9'\); close matches: layer3, "
                                         r"layer2, layer1, layer3.0, layer2.0, layer1.0"):
        Distiller(student, teacher, {"ce": 1.0, "at": 1.0}, student_taps=["layer9", "fc:input"])
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    err = cli_error(capsys, ["distill", "digits", "losses={ce: 1, at: 1000}", f"teacher.weights={tmp_path / 'teacher.pt'}",
                             "student.taps=[stage9, 'fc:input']", "--output", str(tmp_path / "run")])
    assert "ResNet has no module 'stage9' (tap 'stage9'); its top-level modules: conv1, bn1, relu, layer1, layer2, " \
           "layer3, avgpool, fc" in err, err


def test_recipes_take_taps_kwargs_and_weights(tmp_path):
    from fastkd.train.recipe import load_recipe

    recipe = load_recipe("cifar100_vit_srd", ["student.kwargs.depth=2", "teacher.weights=t.safetensors",
                                              "student.taps=[patch_embed, blocks.1, 'head:input']"])
    assert recipe.student.name == "timm:vit_tiny_patch16_224"
    assert recipe.student.kwargs == {"img_size": 32, "patch_size": 4, "drop_path_rate": 0.1, "depth": 2}
    assert recipe.teacher.weights == "t.safetensors" and recipe.student.taps == ["patch_embed", "blocks.1", "head:input"]
    with pytest.raises(ValueError, match=r"student.taps must be list\[str\] \| None, got \[1, 2\]"):
        load_recipe("digits", ["student.taps=[1, 2]"])
    deit = load_recipe("imagenet_deit_tiny_srd_token")
    assert deit.student.name == "timm:deit_tiny_distilled_patch16_224"
    assert deit.losses == {"ce": {"weight": 0.5}, "deit": {"weight": 0.5},
                           "srd": {"weight": 1.0, "alpha": 4.0, "mode": "correlation"}}
    assert load_recipe("imagenet_deit_tiny_srd").losses["kd"] == {"weight": 1.0, "temperature": 1.0}


def test_hard_distillation_loss_is_cross_entropy_against_the_teachers_top_class():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    expected = -sum(torch.log_softmax(s[b], 0)[int(t[b].argmax())] for b in range(6)) / 6
    value = fastkd.HardDistillationLoss()(s, t)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="must match"):
        fastkd.functional.hard_distillation_loss(s, t[:, :4])
    assert float(F.cross_entropy(s.float(), t.argmax(1))) == pytest.approx(float(value), rel=1e-6)


def test_run_folders_before_the_new_keys_keep_their_ids_and_names_lose_the_colon():
    from fastkd.train.recipe import load_recipe
    from fastkd.train.rundir import default_folder, describe

    plain = describe(load_recipe("digits"))
    assert not any(key.startswith(("student.kwargs", "student.weights", "student.taps")) for key in plain)
    told = describe(load_recipe("digits", ["student.kwargs.drop_rate=0.1"]))
    assert told["student.kwargs.drop_rate"] == 0.1
    folder = default_folder("cifar100_vit_srd", load_recipe("cifar100_vit_srd", ["teacher=null"]))
    assert os.path.basename(os.path.dirname(folder)) == "cifar100_vit_srd"
    assert os.path.basename(folder).startswith("timm-vit_tiny_patch16_224-") and ":" not in folder


def test_the_class_count_comes_from_the_data(capsys, tmp_path):
    err = cli_error(capsys, ["train", "digits", "student.kwargs.num_classes=5", "--output", str(tmp_path / "r")])
    assert "student.kwargs.num_classes: the class count comes from the data (10); leave it out" in err, err
