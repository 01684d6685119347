"""IUSP end to end: the sequence models, the frames feature, and one epoch of the recipe digits_seq_iusp on the
embedded digits through the engine (and the CLI)."""
import copy

import pytest
import torch

from fastkd.models import create
from fastkd.train.checkpoint import save_checkpoint
from fastkd.train.distiller import Distiller
from fastkd.train.recipe import load_recipe
from fastkd.train.run import make_trainer


def test_sequence_models_read_rows_as_frames():
    x = torch.randn(4, 3, 8, 8)
    for name, width in (("rowconv", 128), ("rowgru", 32)):
        features, logits = create(name, num_classes=10)(x, is_feat=True)
        assert features[-2].shape == (4, 8, width) and features[-1].shape == (4, width) and logits.shape == (4, 10)
    # 32 × 32 digits (pixels repeated 4×): the same 8 features per frame, 32 frames
    model = create("rowgru").eval()
    big = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    features, _ = model(big, is_feat=True)
    assert features[-2].shape == (4, 32, 32)
    torch.testing.assert_close(model(big, is_feat=True)[0][0][:, 0], model(x, is_feat=True)[0][0][:, 0])


def test_image_models_offer_no_frames():
    losses = load_recipe("digits_seq_iusp").losses
    distiller = Distiller(create("rowgru"), create("rowconv"), losses, torch.randn(4, 3, 8, 8), num_data=10)
    images, target = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    assert torch.isfinite(distiller(images, target)[0])
    with pytest.raises(ValueError, match=r"frames feature \(features\[-2\]\) must be per-frame \[B, T, C\]"):
        Distiller(create("resnet8", num_classes=10), create("resnet8", num_classes=10), losses,
                  torch.randn(4, 3, 32, 32), num_data=10)


@pytest.mark.filterwarnings("ignore:the teacher's test top-1")  # an untrained teacher
def test_the_recipe_trains_an_epoch_on_the_embedded_digits(tmp_path):
    torch.manual_seed(0)
    teacher = str(tmp_path / "rowconv.pt")
    save_checkpoint(teacher, {"model": create("rowconv", num_classes=10).state_dict()})
    recipe = load_recipe("digits_seq_iusp", ["epochs=1", f"teacher.checkpoint={teacher}"])
    assert recipe.losses == {"ce": {"weight": 1.0}, "iusp": {"weight": 10.0}} and recipe.data.image_size == 8
    trainer = make_trainer(recipe, device="cpu", output=str(tmp_path / "run"))
    before = copy.deepcopy(trainer.distiller.student.state_dict())
    history = trainer.fit(log=None)
    last = history[-1]
    assert len(history) == 1 and 0 < last["train_iusp"] < 1
    assert last["train_loss"] == pytest.approx(last["train_ce"] + 10.0 * last["train_iusp"], rel=1e-4)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.distiller.student.state_dict().items())
    assert last["test_top1"] > 10  # better than chance after one epoch


@pytest.mark.filterwarnings("ignore:the teacher's test top-1")
def test_the_recipe_runs_from_the_command_line(tmp_path, capsys):
    from fastkd.cli import main

    teacher = str(tmp_path / "rowconv.pt")
    save_checkpoint(teacher, {"model": create("rowconv", num_classes=10).state_dict()})
    assert main(["distill", "digits_seq_iusp", "epochs=1", f"teacher.checkpoint={teacher}", "--output",
                 str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert "rowgru + IUSP" in capsys.readouterr().out
