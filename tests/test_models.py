"""The model zoo and feature taps.

The ``state_dict`` expectations below were taken from RepDistiller's own model code
(HobbitLong/RepDistiller, models/*.py) and torchvision 0.29's ``models/resnet.py``, run side by side
with this zoo when it was written (same keys in the same order, same shapes and dtypes, and
bit-identical ``is_feat`` / ``preact`` outputs on shared weights). ``sig`` is the first 16 hex digits
of the sha256 of the ``"key shape"`` lines of the reference's ``state_dict``, in order: it pins every
key, its position and its shape; the literal pairs and counts say the same thing readably.
"""
import hashlib
import io
import weakref

import pytest
import torch
from torch import nn

from fastkd.models import CIFAR_MODELS, IMAGENET_MODELS, MULTIBRANCH_MODELS, FeatureTap, create, default_taps, names


def _sig(state_dict):
    lines = "\n".join(f"{key} {tuple(value.shape)}" for key, value in state_dict.items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _input(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batches of two: one thread is as fast, and immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # the models' random initialisation


# name: (state_dict entries, parameters with 100 classes, sig of RepDistiller's state_dict)
CIFAR_EXPECTED = {
    "resnet8": (56, 83_892, "b0d6b90b7f82eae7"),
    "resnet14": (92, 181_108, "09b9f32bbe1fd323"),
    "resnet20": (128, 278_324, "d62528ebf09500ac"),
    "resnet32": (200, 472_756, "871c1b2d9e39d361"),
    "resnet44": (272, 667_188, "e3f9bc0daaf54a9b"),
    "resnet56": (344, 861_620, "7d3a91d4a8b97b8c"),
    "resnet110": (668, 1_736_564, "471c41f07af2c39c"),
    "resnet8x4": (62, 1_233_540, "a04332a459ae1465"),
    "resnet32x4": (206, 7_433_860, "24fbb1ea1d0f23f9"),
    "ResNet50": (320, 23_705_252, "d22cdf0e7420b1ea"),
    "wrn_16_1": (82, 180_916, "413afade7e8fc41a"),
    "wrn_16_2": (83, 703_284, "5994bb013d98efa7"),
    "wrn_40_1": (226, 569_780, "c785d10f458c7b05"),
    "wrn_40_2": (227, 2_255_156, "9a74d15007bab65e"),
    "vgg8": (37, 3_965_028, "fdc773ff39915584"),
    "vgg11": (58, 9_277_284, "0b9551ef3480a6ce"),
    "vgg13": (72, 9_462_180, "bf74037647da8d81"),
    "vgg16": (93, 14_774_436, "a8f839524d333b8f"),
    "vgg19": (114, 20_086_692, "d9c51211c54c99e1"),
    "MobileNetV2": (320, 812_836, "68a2c5f51e5cea07"),
    "ShuffleV1": (296, 949_258, "a2ef493a832e640c"),
    "ShuffleV2": (338, 1_355_528, "577996dd44e66b38"),
}

# a few (key, shape) pairs per model, read off RepDistiller's code
CIFAR_KEYS = {
    "resnet8": [
        ("conv1.weight", (16, 3, 3, 3)), ("layer1.0.conv1.weight", (16, 16, 3, 3)),
        ("layer2.0.downsample.0.weight", (32, 16, 1, 1)), ("layer2.0.downsample.1.num_batches_tracked", ()),
        ("layer3.0.bn2.running_var", (64,)), ("fc.weight", (100, 64)), ("fc.bias", (100,)),
    ],
    "resnet14": [
        ("layer1.1.conv2.weight", (16, 16, 3, 3)), ("layer3.0.downsample.0.weight", (64, 32, 1, 1)),
        ("layer3.1.bn2.weight", (64,)), ("fc.weight", (100, 64)),
    ],
    "resnet20": [
        ("layer1.2.conv2.weight", (16, 16, 3, 3)), ("layer2.0.conv1.weight", (32, 16, 3, 3)),
        ("layer3.2.bn2.bias", (64,)), ("fc.weight", (100, 64)),
    ],
    "resnet32": [
        ("layer1.4.conv2.weight", (16, 16, 3, 3)), ("layer2.0.downsample.1.running_mean", (32,)),
        ("layer3.4.conv1.weight", (64, 64, 3, 3)), ("fc.weight", (100, 64)),
    ],
    "resnet44": [
        ("layer1.6.conv1.weight", (16, 16, 3, 3)), ("layer3.6.bn2.num_batches_tracked", ()),
        ("fc.weight", (100, 64)),
    ],
    "resnet56": [
        ("layer1.8.conv2.weight", (16, 16, 3, 3)), ("layer2.0.downsample.0.weight", (32, 16, 1, 1)),
        ("layer3.8.conv2.weight", (64, 64, 3, 3)), ("fc.weight", (100, 64)),
    ],
    "resnet110": [
        ("layer1.17.conv2.weight", (16, 16, 3, 3)), ("layer3.0.downsample.0.weight", (64, 32, 1, 1)),
        ("layer3.17.bn2.running_var", (64,)), ("fc.weight", (100, 64)),
    ],
    "resnet8x4": [
        ("conv1.weight", (32, 3, 3, 3)), ("layer1.0.downsample.0.weight", (64, 32, 1, 1)),
        ("layer3.0.conv1.weight", (256, 128, 3, 3)), ("layer3.0.conv2.weight", (256, 256, 3, 3)),
        ("fc.weight", (100, 256)),
    ],
    "resnet32x4": [
        ("conv1.weight", (32, 3, 3, 3)), ("layer1.0.downsample.0.weight", (64, 32, 1, 1)),
        ("layer1.4.conv2.weight", (64, 64, 3, 3)), ("layer3.4.bn2.weight", (256,)), ("fc.weight", (100, 256)),
    ],
    "ResNet50": [
        ("conv1.weight", (64, 3, 3, 3)), ("layer1.0.shortcut.0.weight", (256, 64, 1, 1)),
        ("layer1.0.shortcut.1.num_batches_tracked", ()), ("layer2.0.conv2.weight", (128, 128, 3, 3)),
        ("layer4.2.conv3.weight", (2048, 512, 1, 1)), ("linear.weight", (100, 2048)),
    ],
    "wrn_16_1": [
        ("block1.layer.0.bn1.weight", (16,)), ("block1.layer.1.conv2.weight", (16, 16, 3, 3)),
        ("block2.layer.0.convShortcut.weight", (32, 16, 1, 1)), ("bn1.running_mean", (64,)),
        ("fc.weight", (100, 64)),
    ],
    "wrn_16_2": [
        ("block1.layer.0.convShortcut.weight", (32, 16, 1, 1)), ("block2.layer.1.conv1.weight", (64, 64, 3, 3)),
        ("block3.layer.0.bn1.weight", (64,)), ("fc.weight", (100, 128)),
    ],
    "wrn_40_1": [
        ("block1.layer.5.conv2.weight", (16, 16, 3, 3)), ("block3.layer.0.convShortcut.weight", (64, 32, 1, 1)),
        ("block3.layer.5.bn2.num_batches_tracked", ()), ("fc.weight", (100, 64)),
    ],
    "wrn_40_2": [
        ("conv1.weight", (16, 3, 3, 3)), ("block1.layer.0.convShortcut.weight", (32, 16, 1, 1)),
        ("block3.layer.5.conv2.weight", (128, 128, 3, 3)), ("bn1.weight", (128,)), ("fc.weight", (100, 128)),
    ],
    "vgg8": [
        ("block0.0.weight", (64, 3, 3, 3)), ("block0.0.bias", (64,)), ("block0.1.num_batches_tracked", ()),
        ("block3.0.weight", (512, 256, 3, 3)), ("block4.1.running_var", (512,)),
        ("classifier.weight", (100, 512)),
    ],
    "vgg11": [
        ("block2.3.weight", (256, 256, 3, 3)), ("block3.4.bias", (512,)), ("block4.0.weight", (512, 512, 3, 3)),
        ("classifier.bias", (100,)),
    ],
    "vgg13": [
        ("block0.3.weight", (64, 64, 3, 3)), ("block1.4.running_mean", (128,)), ("block4.4.weight", (512,)),
        ("classifier.weight", (100, 512)),
    ],
    "vgg16": [
        ("block2.6.weight", (256, 256, 3, 3)), ("block3.7.bias", (512,)), ("block4.7.running_var", (512,)),
        ("classifier.weight", (100, 512)),
    ],
    "vgg19": [
        ("block2.9.weight", (256, 256, 3, 3)), ("block3.10.weight", (512,)), ("block4.10.bias", (512,)),
        ("classifier.weight", (100, 512)),
    ],
    "MobileNetV2": [
        ("conv1.0.weight", (16, 3, 3, 3)), ("blocks.0.0.conv.0.weight", (16, 16, 1, 1)),
        ("blocks.1.0.conv.3.weight", (48, 1, 3, 3)), ("blocks.6.0.conv.7.running_mean", (160,)),
        ("conv2.0.weight", (1280, 160, 1, 1)), ("classifier.0.weight", (100, 1280)),
    ],
    "ShuffleV1": [
        ("conv1.weight", (24, 3, 1, 1)), ("layer1.0.conv1.weight", (54, 24, 1, 1)),
        ("layer1.0.conv3.weight", (216, 18, 1, 1)), ("layer1.1.conv1.weight", (60, 80, 1, 1)),
        ("layer2.0.conv2.weight", (60, 1, 3, 3)), ("layer3.3.bn3.weight", (960,)),
        ("linear.weight", (100, 960)),
    ],
    "ShuffleV2": [
        ("layer1.0.conv1.weight", (24, 1, 3, 3)), ("layer1.0.conv5.weight", (58, 58, 1, 1)),
        ("layer1.1.conv2.weight", (58, 1, 3, 3)), ("layer3.3.bn3.running_var", (232,)),
        ("conv2.weight", (1024, 464, 1, 1)), ("linear.weight", (100, 1024)),
    ],
}

_NARROW = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]
_X4 = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]
_WRN2 = [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)]
_VGG = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)]

# is_feat feature shapes (without the batch dimension) for a 32×32 input
CIFAR_FEATURES = {
    **{name: _NARROW for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                                  "resnet110", "wrn_16_1", "wrn_40_1")},
    "resnet8x4": _X4, "resnet32x4": _X4, "wrn_16_2": _WRN2, "wrn_40_2": _WRN2,
    **{name: _VGG for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "ResNet50": [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4), (2048,)],
    "MobileNetV2": [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,)],
    "ShuffleV1": [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,)],
    "ShuffleV2": [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024,)],
}


def test_names_and_registry():
    assert names() == [
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
        "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13",
        "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", *MULTIBRANCH_MODELS, "resnet18", "resnet34",
        "resnet50", "mobilenet_v1", "rowconv", "rowgru",
    ]
    assert set(CIFAR_EXPECTED) == set(CIFAR_MODELS) and set(CIFAR_KEYS) == set(CIFAR_MODELS)
    assert set(IMAGENET_EXPECTED) | {"mobilenet_v1"} == set(IMAGENET_MODELS)


def test_create_errors_and_options():
    with pytest.raises(ValueError, match=r"'resnet8X4' \(did you mean 'resnet8x4'.*valid names: resnet8, "):
        create("resnet8X4")
    with pytest.raises(ValueError, match="valid names:.*ShuffleV2"):
        create("alexnet")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            create("resnet8", num_classes=bad)
    assert create("resnet8").fc.weight.shape == (100, 64)
    assert create("resnet8", num_classes=10).fc.weight.shape == (10, 64)
    assert create("resnet18").fc.weight.shape == (1000, 512)
    assert create("wrn_16_1", drop_rate=0.3).block1.layer[0].droprate == 0.3
    net = create("resnet18", num_classes=5, zero_init_residual=True)
    assert net.layer1[0].bn2.weight.detach().abs().sum() == 0.0 and net.layer1[0].bn1.weight.detach().sum() == 64.0
    with pytest.raises(TypeError):
        create("resnet8", no_such_option=1)


@pytest.mark.parametrize("name", list(CIFAR_EXPECTED))
def test_cifar_model_state_dict_forward_and_taps(name):
    model = create(name).eval()
    state = model.state_dict()
    entries, params, sig = CIFAR_EXPECTED[name]
    assert len(state) == entries
    assert sum(p.numel() for p in model.parameters()) == params
    assert _sig(state) == sig
    for key, shape in CIFAR_KEYS[name]:
        assert tuple(state[key].shape) == shape, key
    assert all(state[k].dtype == torch.int64 for k in state if k.endswith("num_batches_tracked"))

    x = _input(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats, logits_feat = model(x, is_feat=True)
        pre_feats, logits_pre = model(x, is_feat=True, preact=True)
    assert logits.shape == (2, 100) and torch.isfinite(logits).all()
    assert torch.equal(logits, logits_feat) and torch.equal(logits, logits_pre)
    assert [tuple(f.shape[1:]) for f in feats] == CIFAR_FEATURES[name]
    assert [f.shape for f in pre_feats] == [f.shape for f in feats]
    assert torch.equal(feats[-1], pre_feats[-1])
    if name == "MobileNetV2":  # its group outputs end in BatchNorm: nothing to take before a ReLU
        assert all(torch.equal(a, b) for a, b in zip(feats, pre_feats))
    else:
        assert not torch.equal(feats[1], pre_feats[1])

    for preact, want in ((False, feats), (True, pre_feats)):
        with torch.no_grad(), FeatureTap(model, default_taps(model, preact=preact)) as tap:
            tapped_logits, tapped = tap(x)
        assert torch.equal(tapped_logits, logits)
        assert len(tapped) == len(want)
        assert all(torch.equal(a, b) for a, b in zip(tapped, want)), (name, preact)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        channels_last = model(x.contiguous(memory_format=torch.channels_last))
    # other conv kernels: equal to rounding, relative to the logits' scale (~1e4 for a deep net at init)
    assert (channels_last - logits).abs().max() <= 1e-5 * logits.abs().max()


@pytest.mark.parametrize("name", list(CIFAR_EXPECTED))
def test_repdistiller_checkpoint_round_trip(name):
    torch.manual_seed(0)
    trained = create(name).eval()
    with torch.no_grad():
        for buffer_name, buffer in trained.named_buffers():
            if buffer_name.endswith("running_mean"):
                buffer.uniform_(-0.1, 0.1)
    stream = io.BytesIO()
    torch.save({"epoch": 240, "model": trained.state_dict(), "accuracy": 0.0}, stream)
    stream.seek(0)
    checkpoint = torch.load(stream, weights_only=True)
    torch.manual_seed(1)
    fresh = create(name).eval()
    x = _input(2, 3, 32, 32, seed=3)
    with torch.no_grad():
        assert not torch.equal(fresh(x), trained(x))
        result = fresh.load_state_dict(checkpoint["model"], strict=True)
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert torch.equal(fresh(x), trained(x))


def test_strict_load_rejects_another_architecture():
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
        create("resnet8").load_state_dict(create("resnet8x4").state_dict())
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "layer1.1.conv1.weight"'):
        create("resnet8").load_state_dict(create("resnet14").state_dict())


def test_get_bn_before_relu_and_feat_modules():
    for name in ("resnet8", "ResNet50", "wrn_16_1", "vgg8", "MobileNetV2"):
        model = create(name)
        bns = model.get_bn_before_relu()
        assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns) and len(bns) in (3, 4)
        assert all(any(m is p for p in model.modules()) for m in model.get_feat_modules())
    net = create("resnet8x4")
    assert net.get_bn_before_relu()[2] is net.layer3[-1].bn2
    assert [bn.num_features for bn in net.get_bn_before_relu()] == [64, 128, 256]
    for name in ("ShuffleV1", "ShuffleV2"):
        with pytest.raises(NotImplementedError):
            create(name).get_bn_before_relu()


# torchvision's published parameter counts (1000 classes) and the sig of its state_dict
IMAGENET_EXPECTED = {
    "resnet18": (122, 11_689_512, "84fb10d9c6905a1c"),
    "resnet34": (218, 21_797_672, "28f9096d51307499"),
    "resnet50": (320, 25_557_032, "d7e4f8bb0a536344"),
}

IMAGENET_KEYS = {
    "resnet18": [("conv1.weight", (64, 3, 7, 7)), ("layer2.0.downsample.0.weight", (128, 64, 1, 1)),
                 ("layer4.1.conv2.weight", (512, 512, 3, 3)), ("fc.weight", (1000, 512))],
    "resnet34": [("layer1.2.conv2.weight", (64, 64, 3, 3)), ("layer3.5.bn2.running_var", (256,)),
                 ("layer4.0.downsample.1.num_batches_tracked", ()), ("fc.weight", (1000, 512))],
    "resnet50": [("layer1.0.conv1.weight", (64, 64, 1, 1)), ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
                 ("layer2.0.conv2.weight", (128, 128, 3, 3)), ("layer4.2.conv3.weight", (2048, 512, 1, 1)),
                 ("fc.weight", (1000, 2048))],
}

# is_feat feature shapes for a 64×64 input: stem (after max-pool), four stages, pooled
IMAGENET_FEATURES = {
    "resnet18": [(64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512,)],
    "resnet34": [(64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512,)],
    "resnet50": [(64, 16, 16), (256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2), (2048,)],
}

RESNET18_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn1.running_mean",
    "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked", "layer1.0.conv2.weight", "layer1.0.bn2.weight",
    "layer1.0.bn2.bias", "layer1.0.bn2.running_mean", "layer1.0.bn2.running_var", "layer1.0.bn2.num_batches_tracked",
    "layer1.1.conv1.weight", "layer1.1.bn1.weight", "layer1.1.bn1.bias", "layer1.1.bn1.running_mean",
    "layer1.1.bn1.running_var", "layer1.1.bn1.num_batches_tracked", "layer1.1.conv2.weight", "layer1.1.bn2.weight",
    "layer1.1.bn2.bias", "layer1.1.bn2.running_mean", "layer1.1.bn2.running_var", "layer1.1.bn2.num_batches_tracked",
    "layer2.0.conv1.weight", "layer2.0.bn1.weight", "layer2.0.bn1.bias", "layer2.0.bn1.running_mean",
    "layer2.0.bn1.running_var", "layer2.0.bn1.num_batches_tracked", "layer2.0.conv2.weight", "layer2.0.bn2.weight",
    "layer2.0.bn2.bias", "layer2.0.bn2.running_mean", "layer2.0.bn2.running_var", "layer2.0.bn2.num_batches_tracked",
    "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias",
    "layer2.0.downsample.1.running_mean", "layer2.0.downsample.1.running_var",
    "layer2.0.downsample.1.num_batches_tracked", "layer2.1.conv1.weight", "layer2.1.bn1.weight", "layer2.1.bn1.bias",
    "layer2.1.bn1.running_mean", "layer2.1.bn1.running_var", "layer2.1.bn1.num_batches_tracked",
    "layer2.1.conv2.weight", "layer2.1.bn2.weight", "layer2.1.bn2.bias", "layer2.1.bn2.running_mean",
    "layer2.1.bn2.running_var", "layer2.1.bn2.num_batches_tracked", "layer3.0.conv1.weight", "layer3.0.bn1.weight",
    "layer3.0.bn1.bias", "layer3.0.bn1.running_mean", "layer3.0.bn1.running_var", "layer3.0.bn1.num_batches_tracked",
    "layer3.0.conv2.weight", "layer3.0.bn2.weight", "layer3.0.bn2.bias", "layer3.0.bn2.running_mean",
    "layer3.0.bn2.running_var", "layer3.0.bn2.num_batches_tracked", "layer3.0.downsample.0.weight",
    "layer3.0.downsample.1.weight", "layer3.0.downsample.1.bias", "layer3.0.downsample.1.running_mean",
    "layer3.0.downsample.1.running_var", "layer3.0.downsample.1.num_batches_tracked", "layer3.1.conv1.weight",
    "layer3.1.bn1.weight", "layer3.1.bn1.bias", "layer3.1.bn1.running_mean", "layer3.1.bn1.running_var",
    "layer3.1.bn1.num_batches_tracked", "layer3.1.conv2.weight", "layer3.1.bn2.weight", "layer3.1.bn2.bias",
    "layer3.1.bn2.running_mean", "layer3.1.bn2.running_var", "layer3.1.bn2.num_batches_tracked",
    "layer4.0.conv1.weight", "layer4.0.bn1.weight", "layer4.0.bn1.bias", "layer4.0.bn1.running_mean",
    "layer4.0.bn1.running_var", "layer4.0.bn1.num_batches_tracked", "layer4.0.conv2.weight", "layer4.0.bn2.weight",
    "layer4.0.bn2.bias", "layer4.0.bn2.running_mean", "layer4.0.bn2.running_var", "layer4.0.bn2.num_batches_tracked",
    "layer4.0.downsample.0.weight", "layer4.0.downsample.1.weight", "layer4.0.downsample.1.bias",
    "layer4.0.downsample.1.running_mean", "layer4.0.downsample.1.running_var",
    "layer4.0.downsample.1.num_batches_tracked", "layer4.1.conv1.weight", "layer4.1.bn1.weight", "layer4.1.bn1.bias",
    "layer4.1.bn1.running_mean", "layer4.1.bn1.running_var", "layer4.1.bn1.num_batches_tracked",
    "layer4.1.conv2.weight", "layer4.1.bn2.weight", "layer4.1.bn2.bias", "layer4.1.bn2.running_mean",
    "layer4.1.bn2.running_var", "layer4.1.bn2.num_batches_tracked", "fc.weight", "fc.bias",
]


def test_resnet18_keys_are_torchvisions():
    assert list(create("resnet18").state_dict()) == RESNET18_KEYS


@pytest.mark.parametrize("name", list(IMAGENET_EXPECTED))
def test_imagenet_resnet(name):
    model = create(name).eval()
    state = model.state_dict()
    entries, params, sig = IMAGENET_EXPECTED[name]
    assert len(state) == entries
    assert sum(p.numel() for p in model.parameters()) == params
    assert _sig(state) == sig
    for key, shape in IMAGENET_KEYS[name]:
        assert tuple(state[key].shape) == shape, key
    first = model.layer2[0]
    strided = first.conv2 if name == "resnet50" else first.conv1  # torchvision strides the bottleneck's 3×3
    assert strided.stride == (2, 2) and first.conv1.stride == ((1, 1) if name == "resnet50" else (2, 2))

    x = _input(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        feats, logits_feat = model(x, is_feat=True)
        pre_feats, _ = model(x, is_feat=True, preact=True)
    assert logits.shape == (2, 1000) and torch.equal(logits, logits_feat)
    assert [tuple(f.shape[1:]) for f in feats] == IMAGENET_FEATURES[name]
    assert (pre_feats[2] < 0).any() and not (feats[2] < 0).any()
    for preact, want in ((False, feats), (True, pre_feats)):
        with torch.no_grad(), FeatureTap(model, default_taps(model, preact=preact)) as tap:
            _, tapped = tap(x)
        assert all(torch.equal(a, b) for a, b in zip(tapped, want)), preact
    last = len(model.layer4) - 1
    assert default_taps(model, preact=True)[4] == f"layer4.{last}.relu:input"


class _Tiny(nn.Module):
    """A small custom model: an in-place activation, a reused module, a kwargs-only call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Tanh())
        self.shared = nn.Identity()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = self.shared(self.body(x))
        x = self.shared(input=x * 2.0)
        return self.head(x.mean((2, 3)))


def _tiny():
    torch.manual_seed(0)
    return _Tiny().eval()


def test_tap_outputs_inputs_and_order_on_a_custom_model():
    model = _tiny()
    x = _input(2, 3, 6, 6)
    with torch.no_grad():
        pre = model.bn(model.conv(x))
        body = model.body(torch.relu(pre))
        expected = {"act:input": pre, "act": torch.relu(pre), "body.0": model.body[0](torch.relu(pre)),
                    "body": body, "shared": body * 2.0, "shared:input": body * 2.0,
                    "head:input": (body * 2.0).mean((2, 3)), "": model(x), ":input": x}
        order = ["head:input", "act:input", "body.0", "act", "shared", "body:output", "", ":input", "shared:input"]
        with FeatureTap(model, order) as tap:
            logits = model(x)
            got = tap.as_dict()
            assert list(got) == order
            for spec in order:
                assert torch.allclose(got[spec], expected[spec.replace(":output", "")], atol=1e-6), spec
            assert (got["act:input"] < 0).any()          # cloned before the in-place ReLU overwrote it
            assert torch.equal(tap["act"], torch.relu(got["act:input"]))
            assert torch.equal(got[""], logits)
            feats = tap.pop()
            assert [f.shape for f in feats] == [got[s].shape for s in order]


def test_tap_works_on_plain_nn_sequential():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)).eval()
    x = _input(4, 5)
    with FeatureTap(model, ["0", "1:input", "2:input"]) as tap:
        out, (a, b, c) = tap(x)
    with torch.no_grad():
        h = model[0](x)
    assert torch.allclose(a, h) and torch.allclose(b, h) and torch.allclose(c, torch.relu(h))
    assert torch.allclose(out, model[2](torch.relu(h)))


def test_tap_features_carry_gradients():
    model = create("resnet8").train()
    with FeatureTap(model, default_taps(model)) as tap:
        _, feats = tap(_input(2, 3, 32, 32))
    assert all(f.requires_grad for f in feats)
    sum(f.pow(2).mean() for f in feats).backward()
    assert model.conv1.weight.grad is not None and float(model.conv1.weight.grad.abs().sum()) > 0
    assert model.fc.weight.grad is None  # the features stop before the classifier


def test_tap_detects_values_overwritten_in_place():
    model = create("resnet8").eval()
    x = _input(2, 3, 32, 32)
    with torch.no_grad(), FeatureTap(model, ["layer1.0.bn2"]) as tap:  # the block then does `out += shortcut`
        model(x)
        with pytest.raises(RuntimeError, match="modified in place.*clone=True"):
            tap.pop()
    block = model.layer1[0]
    with torch.no_grad(), FeatureTap(model, ["layer1.0.bn2", "relu"], clone=True) as tap:
        model(x)
        bn2, stem = tap.pop()
        assert torch.equal(bn2, block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem))))))


def test_tap_keeps_no_tensors_between_steps():
    model = _tiny()
    tap = FeatureTap(model, ["body", "act:input"])
    with torch.no_grad():
        model(_input(2, 3, 6, 6))
        ref = weakref.ref(tap["body"])
        assert ref() is not None
        model(_input(2, 3, 6, 6, seed=1))           # the next forward drops the previous features
        assert ref() is None
        ref = weakref.ref(tap["body"])
        feats = tap.pop()                             # taking them leaves nothing behind
        assert tap._values == {}
        del feats
        assert ref() is None
        with pytest.raises(RuntimeError, match="did not run in the last forward"):
            tap.values()
    tap.remove()


def test_tap_records_the_last_call_of_a_reused_module():
    model = _tiny()
    x = _input(2, 3, 6, 6)
    with torch.no_grad(), FeatureTap(model, ["shared", "shared:input"]) as tap:
        model(x)
        first, second = tap.pop()
        body = model.body(model.act(model.bn(model.conv(x))))
    assert torch.allclose(first, body * 2.0) and torch.allclose(second, body * 2.0)


def test_tap_skipped_module_raises_and_vgg_pool3():
    model = create("vgg8").eval()
    with torch.no_grad(), FeatureTap(model, ["pool3:input", "block4:input"]) as tap:
        model(_input(1, 3, 32, 32))
        with pytest.raises(RuntimeError, match="'pool3:input' did not run"):
            tap.pop()
        model(_input(1, 3, 64, 64))
        f3, block4_in = tap.pop()
        assert f3.shape == (1, 512, 8, 8) and block4_in.shape == (1, 512, 4, 4)


def test_tap_remove_and_context_manager():
    model = _tiny()
    x = _input(2, 3, 6, 6)
    with torch.no_grad():
        before = model(x)
        tap = FeatureTap(model, ["act:input", "body", ""])
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 4
        model(x)
        tap.remove()
        tap.remove()
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert torch.equal(model(x), before)      # the model computes the same without the hooks
        with pytest.raises(RuntimeError, match="removed"):
            tap["body"]
        with FeatureTap(model, ["body"]) as tap:
            model(x)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert "removed" in repr(tap)


def test_tap_errors():
    model = create("resnet8")
    with pytest.raises(ValueError, match=r"no module 'layer33'.*close matches: layer3"):
        FeatureTap(model, ["layer1", "layer33"])
    with pytest.raises(ValueError, match=r"no module 'layr2.0.conv1'.*layer2.0.conv1"):
        FeatureTap(model, ["layr2.0.conv1:input"])
    with pytest.raises(ValueError, match=r"no module 'zzzz'.*top-level modules: conv1, bn1, relu, layer1"):
        FeatureTap(model, ["zzzz"])
    with pytest.raises(ValueError, match="'module:output' or 'module:input', got 'inputs'"):
        FeatureTap(model, ["layer3:inputs"])
    with pytest.raises(TypeError, match="list of module names"):
        FeatureTap(model, "layer3")
    with pytest.raises(TypeError, match="non-empty"):
        FeatureTap(model, [])
    with pytest.raises(TypeError, match="nn.Module"):
        FeatureTap(lambda x: x, ["a"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing half-registered
    with FeatureTap(model, ["layer1"]) as tap, pytest.raises(KeyError, match="not one of the tapped names"):
        tap["layer2"]
    with pytest.raises(TypeError, match="no default taps for Sequential"):
        default_taps(nn.Sequential(nn.Linear(2, 2)))


def test_default_taps_names():
    assert default_taps(create("resnet8x4")) == ["relu", "layer1", "layer2", "layer3", "fc:input"]
    assert default_taps(create("resnet8x4"), preact=True) == [
        "relu", "layer1.0.relu_out:input", "layer2.0.relu_out:input", "layer3.0.relu_out:input", "fc:input"]
    assert default_taps(create("wrn_40_2"), preact=True) == [
        "conv1", "block2.layer.0.relu1:input", "block3.layer.0.relu1:input", "relu:input", "fc:input"]
    assert default_taps(create("resnet18")) == ["layer1:input", "layer1", "layer2", "layer3", "layer4", "fc:input"]
