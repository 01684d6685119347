"""Recipes: shipped files validate, base merging, overrides, and clear errors for bad keys."""
import pytest

from fastkd.losses import registered
from fastkd.train.recipe import Recipe, build, load_recipe, shipped


def test_every_shipped_recipe_validates():
    names = shipped()
    assert {"cifar100", "cifar100_kd", "cifar100_crd", "cifar100_crd_kd", "imagenet_r34_r18"} <= set(names)
    for name in names:
        assert isinstance(load_recipe(name), Recipe)


def test_repdistiller_cifar100_setting_and_method_weights():
    crd_kd = load_recipe("cifar100_crd_kd")
    assert crd_kd.epochs == 240 and crd_kd.data.batch_size == 64
    assert crd_kd.optim.lr == 0.05 and crd_kd.optim.weight_decay == 5e-4 and crd_kd.optim.momentum == 0.9
    assert crd_kd.schedule.milestones == [150, 180, 210] and crd_kd.schedule.gamma == 0.1
    assert {k: v["weight"] for k, v in crd_kd.losses.items()} == {"ce": 1.0, "kd": 1.0, "crd": 0.8}
    kd = load_recipe("cifar100_kd")
    assert {k: v["weight"] for k, v in kd.losses.items()} == {"ce": 0.1, "kd": 0.9}  # a recipe's losses replace the base's
    weights = {name: load_recipe(f"cifar100_{name}").losses[key]["weight"]
               for name, key in [("fitnet", "hint"), ("at", "at"), ("sp", "sp"), ("cc", "cc"), ("pkt", "pkt"),
                                 ("nst", "nst"), ("crd", "crd"), ("rkd", "rkd"), ("vid", "vid")]}
    assert weights == {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "cc": 0.02, "pkt": 30000.0, "nst": 50.0,
                       "crd": 0.8, "rkd": 1.0, "vid": 1.0}
    imagenet = load_recipe("imagenet_r34_r18")
    assert imagenet.schedule.milestones == [30, 60, 90] and imagenet.epochs == 100 and imagenet.optim.lr == 0.1


def test_overrides_are_typed_and_nested():
    recipe = load_recipe("cifar100_crd_kd", ["optim.lr=0.01", "schedule.milestones=[30, 60]", "losses.kd.weight=2",
                                             "student.name=wrn_16_2", "amp=bf16", "losses.crd.num_negatives=4096"])
    assert recipe.optim.lr == 0.01 and isinstance(recipe.optim.lr, float)
    assert recipe.schedule.milestones == [30, 60]
    assert recipe.losses["kd"]["weight"] == 2.0 and recipe.losses["crd"]["num_negatives"] == 4096
    assert recipe.student.name == "wrn_16_2" and recipe.amp == "bf16"


def test_file_recipe_with_a_base(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: cifar100_kd\nepochs: 3\noptim: {lr: 0.2}\n")
    recipe = load_recipe(str(path))
    assert recipe.epochs == 3 and recipe.optim.lr == 0.2 and recipe.optim.momentum == 0.9
    assert set(recipe.losses) == {"ce", "kd"}


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", r"unknown key 'lrr' in optim; valid: lr, momentum, name, nesterov, reference_batch, weight_decay"),
    ("epochz=3", r"unknown key 'epochz' in the recipe; valid: .*epochs"),
    ("losses.kd.temprature=3", r"unknown key 'temprature' in losses.kd; valid: .*temperature"),
    ("losses.mse={weight: 1}", r"unknown key 'mse' in losses; valid: .*crd"),
    ("losses.crd={weight: 0.8, s_dim: 5}", r"unknown key 's_dim' in losses.crd"),  # derived by the engine
    ("optim.name=lamb", r"optim.name must be one of \('sgd', 'adamw'\)"),
    ("epochs=ten", r"epochs must be int, got 'ten'"),
    ("amp=fp8", r"amp must be one of"),
    ("losses.kd={temperature: 2}", r"losses.kd needs a weight"),
    ("optim.lr", r"must look like key=value"),
])
def test_bad_keys_and_values_are_refused_with_the_valid_choices(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("cifar100_kd", [override])


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="neither a file nor a shipped recipe .*cifar100_crd_kd"):
        load_recipe("cifar1000")


def test_every_loss_is_buildable_from_its_options():
    assert set(registered()) >= {"kd", "dkd", "crd", "sp", "cckd", "srd"}
    recipe = build({"losses": {"ce": 1.0, "cckd": {"weight": 1.0, "gamma": 0.4, "order": 2}}})
    assert recipe.losses["cckd"] == {"weight": 1.0, "gamma": 0.4, "order": 2}


def test_data_download_is_for_cifar_only():
    assert build({"data": {"name": "cifar100", "root": "/data", "download": True}}).data.download is True
    assert build({}).data.download is False
    with pytest.raises(ValueError, match=r"data.download=true fetches CIFAR-10 / CIFAR-100 only: an imagefolder tree "
                                         r"must already be under data.root \(set data.download=false\)"):
        build({"data": {"name": "imagefolder", "root": "/data/imagenet", "download": True}})
    with pytest.raises(ValueError, match="data.download must be bool, got 'yes'"):
        build({"data": {"download": "yes"}})
