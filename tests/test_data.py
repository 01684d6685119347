"""fastkd.data: digits, CIFAR pickles, ImageFolder + cache, index datasets, contrast sampling,
device-side augmentation."""
import hashlib
import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from fastkd.data import (CIFAR10, CIFAR100, ArrayDataset, ContrastSampler, DeviceDataset, DeviceLoader, Digits,
                         ImageFolder, IndexedDataset, channel_stats, crop_flip, load_digits)
from fastkd.data import download as download_module
from fastkd.data import folder as folder_module
from fastkd.data.digits import raw_digits
from fastkd.train.recipe import build
from fastkd.train.run import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TARBALL = os.path.join(REPO, "..", "shared", "data", "cifar10-jpg.tar.gz")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- digits ---------------------------------------------------------------------------------------

def test_digits_shapes_counts_and_normalisation():
    d = load_digits()
    assert d.x_train.shape == (1347, 1, 8, 8) and d.x_test.shape == (450, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert torch.bincount(d.y_train).tolist() == [134, 136, 133, 137, 136, 136, 136, 134, 130, 135]
    assert torch.bincount(d.y_test).tolist() == [44, 46, 44, 46, 45, 46, 45, 45, 44, 45]
    assert abs(float(d.x_train.double().mean())) < 1e-6
    assert float(d.x_train.double().std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)


def test_shipped_digits_file_is_unchanged():
    images, targets = raw_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert targets.shape == (1797,) and targets.dtype == np.int64
    assert np.bincount(targets).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # SHA-256 of the arrays' bytes as written from scikit-learn 1.9.1's load_digits (see fastkd/data/digits.py)
    assert hashlib.sha256(images.tobytes()).hexdigest() == (
        "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3")
    assert hashlib.sha256(targets.tobytes()).hexdigest() == (
        "a3c91c262eddcf7ba8f0e37507c30284493c9b20412ffe4af30d536401f7ba21")


def test_shipped_digits_equal_sklearns():
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = datasets.load_digits()
    images, targets = raw_digits()
    assert np.array_equal(images.astype(np.float64), bunch.images) and np.array_equal(targets, bunch.target)


def test_digits_split_is_fixed_and_disjoint():
    images, targets = raw_digits()
    train, test = Digits(train=True), Digits(train=False)
    again = load_digits()
    assert torch.equal(again.x_train, load_digits().x_train)
    # every image lands in exactly one split, with its label
    pool = {}
    for i in range(len(images)):
        pool.setdefault(images[i].tobytes(), []).append(int(targets[i]))
    seen = {}
    for ds in (train, test):
        for img, label in zip(ds.data[..., 0], ds.targets):
            assert int(label) in pool[img.tobytes()]
            seen[img.tobytes()] = seen.get(img.tobytes(), 0) + 1
    assert sum(seen.values()) == 1797 and len(train) + len(test) == 1797
    assert train.data.max() == 16 and train.data.dtype == np.uint8
    assert train.mean[0] == pytest.approx(float(train.data.astype(np.float64).mean()), rel=1e-12)
    assert train.std[0] == pytest.approx(float(train.data.astype(np.float64).std()), rel=1e-12)
    # the split's statistics as scikit-learn's copy gave them before the digits shipped with fastkd
    assert train.mean == (4.8996612843355605,) and train.std == (6.0286932908751005,)
    assert hashlib.sha256(test.targets.tobytes()).hexdigest()[:16] == "3ff1b1c2a0cd1ae5"
    assert test.mean == train.mean  # the test split is normalised with the training statistics
    other = Digits(train=False, seed=1)
    assert np.bincount(other.targets).tolist() == np.bincount(test.targets).tolist()
    assert not np.array_equal(other.data, test.data)


def test_digits_upsampled_rgb_repeats_pixels():
    small, big = load_digits(), load_digits(size=32, channels=3)
    assert big.x_train.shape == (1347, 3, 32, 32)
    expected = small.x_train.repeat_interleave(4, 2).repeat_interleave(4, 3).expand(-1, 3, -1, -1)
    assert torch.equal(big.x_train, expected)
    with pytest.raises(ValueError, match="size must be a multiple of 8"):
        load_digits(size=12)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_digits(channels=2)


# --- CIFAR pickles ----------------------------------------------------------------------------------

def _write_pickle(path, obj):
    with open(path, "wb") as stream:
        pickle.dump(obj, stream, protocol=2)


@pytest.fixture
def fake_cifar10(tmp_path):
    """cifar-10-batches-py with 3 images per training batch and 2 test images (one file with bytes keys)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = 2 if name == "test_batch" else 3
        rows[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels[name] = rng.integers(0, 10, n).tolist()
        entry = {"data": rows[name], "labels": labels[name], "batch_label": name}
        if name == "data_batch_2":
            entry = {k.encode(): v for k, v in entry.items()}
        _write_pickle(folder / name, entry)
    _write_pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_vis": 3072})
    return tmp_path, rows, labels


def test_cifar10_pickles_round_trip(fake_cifar10):
    root, rows, labels = fake_cifar10
    train = CIFAR10(root)
    assert train.data.shape == (15, 32, 32, 3) and train.data.dtype == np.uint8
    raw = np.concatenate([rows[f"data_batch_{i}"] for i in range(1, 6)])
    # pixel (r, c) of channel ch sits at ch·1024 + r·32 + c in a row
    for i, ch, r, c in [(0, 0, 0, 0), (4, 1, 5, 31), (14, 2, 31, 7), (7, 2, 16, 16)]:
        assert train.data[i, r, c, ch] == raw[i, ch * 1024 + r * 32 + c]
    assert np.array_equal(train.data.transpose(0, 3, 1, 2).reshape(15, 3072), raw)
    assert train.targets.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    assert train.classes == CIFAR10_NAMES
    test = CIFAR10(root / "cifar-10-batches-py", train=False)  # the folder itself works too
    assert len(test) == 2 and test.targets.tolist() == labels["test_batch"]
    image, label = train[4]
    expected = (torch.from_numpy(raw[4].reshape(3, 32, 32)).float()
                - torch.tensor(train.mean).view(3, 1, 1)) / torch.tensor(train.std).view(3, 1, 1)
    assert label == labels["data_batch_2"][1]
    assert torch.allclose(image, expected, rtol=0, atol=1e-6)
    assert train.mean == pytest.approx((0.4914 * 255, 0.4822 * 255, 0.4465 * 255))


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(4 * 3072, dtype=np.int64).reshape(4, 3072) % 251
    _write_pickle(folder / "train", {"data": data.astype(np.uint8), "fine_labels": [99, 0, 42, 7],
                                     "coarse_labels": [19, 4, 5, 0]})
    _write_pickle(folder / "test", {"data": data[:1].astype(np.uint8), "fine_labels": [3], "coarse_labels": [1]})
    _write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    train = CIFAR100(tmp_path)
    assert train.targets.tolist() == [99, 0, 42, 7] and len(train.classes) == 100 and train.classes[42] == "c42"
    assert train.data[1, 2, 3, 1] == (3072 + 1024 + 2 * 32 + 3) % 251
    assert train.std == pytest.approx((0.2675 * 255, 0.2565 * 255, 0.2761 * 255))
    assert CIFAR100(tmp_path, train=False).targets.tolist() == [3]


def test_cifar_missing_files_error_names_them(tmp_path, fake_cifar10):
    with pytest.raises(FileNotFoundError) as err:
        CIFAR10(tmp_path / "nowhere")
    text = str(err.value)
    assert "cifar-10-batches-py" in text and "data_batch_1" in text and "test_batch" in text
    assert "download=True" in text
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*train, test"):
        CIFAR100(tmp_path / "nowhere")
    root, _, _ = fake_cifar10
    os.remove(root / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        CIFAR10(root)
    assert len(CIFAR10(root, train=False)) == 2


def test_cifar_download_checks_md5(tmp_path, fake_cifar10, monkeypatch):
    root, rows, _ = fake_cifar10
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR10, "url", archive.as_uri())
    monkeypatch.setattr(CIFAR10, "archive_md5", "0" * 32)
    target = tmp_path / "fresh"
    with pytest.raises(OSError, match=f"MD5 {digest}, expected 0{{32}}"):
        CIFAR10(target, download=True)
    assert not (target / "cifar-10-python.tar.gz").exists() and os.listdir(target) == []
    monkeypatch.setattr(CIFAR10, "archive_md5", digest)
    ds = CIFAR10(target, download=True, train=False)
    assert (target / "cifar-10-python.tar.gz").exists()
    assert np.array_equal(ds.data.transpose(0, 3, 1, 2).reshape(2, 3072), rows["test_batch"])


def test_recipe_key_data_download_fetches_cifar(tmp_path, fake_cifar10, monkeypatch):
    root, rows, labels = fake_cifar10
    served = tmp_path / "served.tar.gz"
    with tarfile.open(served, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    requested = []

    def urlopen(url, timeout):  # the network, replaced: serves the fake archive
        requested.append(url)
        return io.BytesIO(served.read_bytes())

    monkeypatch.setattr(download_module.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(CIFAR10, "archive_md5", hashlib.md5(served.read_bytes()).hexdigest())
    fresh = tmp_path / "fresh"
    recipe = build({"data": {"name": "cifar10", "root": str(fresh), "download": True}})
    train, test, classes = datasets(recipe)
    assert requested == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"] and classes == 10
    assert len(train) == 15 and test.targets.tolist() == labels["test_batch"]
    assert np.array_equal(test.data.transpose(0, 3, 1, 2).reshape(2, 3072), rows["test_batch"])
    datasets(recipe)  # the files are there now: nothing is fetched again
    assert len(requested) == 1
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*download=True \(in a recipe: data.download=true\)"):
        datasets(build({"data": {"name": "cifar100", "root": str(fresh)}}))
    assert len(requested) == 1


# --- ImageFolder --------------------------------------------------------------------------------------

def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def tree(tmp_path):
    """root/{b_cat, a_dog}: 3 PNGs (one nested), 2 JPEGs (one .JPG), plus files that are not images."""
    rng = np.random.default_rng(1)
    root = tmp_path / "tree"
    pixels = {}
    for rel in ["b_cat/2.png", "b_cat/1.png", "a_dog/sub/x.png"]:
        pixels[rel] = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        _png(root / rel, pixels[rel])
    flat = np.full((6, 5, 3), 120, dtype=np.uint8)
    from PIL import Image

    Image.fromarray(flat).save(root / "a_dog" / "y.JPG", format="JPEG", quality=95)
    Image.fromarray(flat).save(root / "b_cat" / "0.jpeg", format="JPEG", quality=95)
    (root / "b_cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    _png(root / ".hidden" / "z.png", flat)
    return root, pixels


def test_image_folder_mapping_and_decoding(tree):
    root, pixels = tree
    ds = ImageFolder(root)
    assert ds.classes == ["a_dog", "b_cat"] and ds.class_to_idx == {"a_dog": 0, "b_cat": 1}
    rel = [os.path.relpath(p, root) for p, _ in ds.samples]
    assert rel == ["a_dog/sub/x.png", "a_dog/y.JPG", "b_cat/0.jpeg", "b_cat/1.png", "b_cat/2.png"]
    assert ds.targets.tolist() == [0, 0, 1, 1, 1]
    image, label = ds[3]
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    assert label == 1 and image.shape == (3, 6, 5)
    assert torch.allclose(image, (torch.from_numpy(pixels["b_cat/1.png"]).permute(2, 0, 1).float() - mean) / std,
                          rtol=0, atol=1e-6)
    jpeg = folder_module.decode(ds.samples[1][0])
    assert jpeg.shape == (6, 5, 3) and np.abs(jpeg.astype(int) - 120).max() <= 2
    seen = ImageFolder(root, transform=lambda im: (im.mode, im.size))[0]
    assert seen == (("RGB", (5, 6)), 0)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolder(root / "a_dog" / "sub")


def test_image_folder_cache_is_written_and_reused(tree, monkeypatch):
    root, pixels = tree
    cache = root / ".fastkd-cache.npz"
    first = ImageFolder(root, cache=True, cache_path=cache, num_workers=2)
    assert cache.exists() and first.data.shape == (5, 6, 5, 3)
    assert np.array_equal(first.data[4], pixels["b_cat/2.png"])
    assert [f for f in os.listdir(root) if f.endswith(".tmp")] == []

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(folder_module, "decode_kept", no_decoding)
    again = ImageFolder(root, cache=True, cache_path=cache)
    assert np.array_equal(again.data, first.data)
    item, label = again[0]
    assert label == 0 and torch.allclose(item, ImageFolder(root, cache=True, cache_path=cache)[0][0])
    assert DeviceDataset.from_dataset(again).images.shape == (5, 6, 5, 3)
    monkeypatch.undo()
    # a changed tree (one more image) invalidates the cache
    _png(root / "b_cat" / "3.png", pixels["b_cat/1.png"])
    grown = ImageFolder(root, cache=True, cache_path=cache)
    assert grown.data.shape[0] == 6 and np.array_equal(grown.data[5], pixels["b_cat/1.png"])
    with pytest.raises(ValueError, match="holds no 'data' array; an ImageFolder needs cache=True"):
        DeviceDataset.from_dataset(ImageFolder(root))


def test_image_folder_cache_needs_one_size(tree):
    root, _ = tree
    _png(root / "b_cat" / "big.png", np.zeros((7, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"big.png is 5x7 but .* is 5x6: give the images one size"):
        ImageFolder(root, cache=True, cache_path=root / "c.npz", num_workers=1)
    fitted = ImageFolder(root, cache=True, cache_path=root / "c.npz", size=8, num_workers=1)  # or a size
    assert fitted.data.shape == (6, 8, 8, 3)


def test_killed_cache_write_leaves_nothing_that_is_read_back(tree, tmp_path):
    root, pixels = tree
    script = (
        "import os, signal, numpy\n"
        "import fastkd.data.folder as f\n"
        "def savez(stream, **arrays):\n"
        "    stream.write(b'PK\\x03\\x04' + b'\\0' * 4096)\n"
        "    stream.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "f.np.savez = savez\n"
        f"f.ImageFolder({str(root)!r}, cache=True, cache_path={str(root / '.fastkd-cache.npz')!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not (root / ".fastkd-cache.npz").exists()
    leftovers = [f for f in os.listdir(root) if ".fastkd-cache.npz." in f and f.endswith(".tmp")]
    assert len(leftovers) == 1 and os.path.getsize(root / leftovers[0]) == 4100
    rebuilt = ImageFolder(root, cache=True, cache_path=root / ".fastkd-cache.npz")
    assert np.array_equal(rebuilt.data[3], pixels["b_cat/1.png"])
    # a truncated file at the cache's own path (copied half-way, say) is ignored and replaced
    data = (root / ".fastkd-cache.npz").read_bytes()
    (root / ".fastkd-cache.npz").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="unreadable image cache"):
        again = ImageFolder(root, cache=True, cache_path=root / ".fastkd-cache.npz")
    assert np.array_equal(again.data, rebuilt.data)
    assert (root / ".fastkd-cache.npz").read_bytes() == data


@pytest.mark.skipif(not os.path.isfile(SHARED_TARBALL), reason="../shared/data/cifar10-jpg.tar.gz is absent")
def test_real_cifar10_jpegs(tmp_path):
    per_class, taken = 50, {}
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(SHARED_TARBALL) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == "train" and taken.get(parts[1], 0) < per_class:
                taken[parts[1]] = taken.get(parts[1], 0) + 1
                tar.extract(member, tmp_path, **safe)
    ds = ImageFolder(tmp_path / "train", cache=True, cache_path=tmp_path / "cache.npz")
    assert ds.classes == CIFAR10_NAMES
    assert ds.data.shape == (500, 32, 32, 3) and np.bincount(ds.targets).tolist() == [50] * 10
    mean, std = channel_stats(ds.data)
    # the README's statistics over all 50,000 training images; 500 images land within a few units
    assert mean == pytest.approx((125.27, 122.93, 113.86), abs=4.0)
    assert std == pytest.approx((62.53, 61.91, 66.46), abs=3.0)


# --- index datasets --------------------------------------------------------------------------------

def _array_dataset(n=40, classes=4, size=4, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArrayDataset(data, np.arange(n) % classes, (100.0, 110.0, 120.0), (50.0, 55.0, 60.0))


def test_indexed_dataset_returns_indices_and_contrast():
    base = _array_dataset()
    plain = IndexedDataset(base)
    image, label, index = plain[13]
    assert index == 13 and label == 1 and torch.equal(image, base[13][0])
    assert plain[-1][2] == 39
    with pytest.raises(IndexError, match="index 40 is out of range"):
        plain[40]
    crd = IndexedDataset(base, num_negatives=8, mode="exact", seed=3)
    image, label, index, contrast = crd[13]
    assert contrast.shape == (9,) and contrast.dtype == torch.int64 and int(contrast[0]) == 13
    assert (torch.from_numpy(base.targets)[contrast[1:]] != 1).all() and contrast[1:].unique().numel() == 8
    relax = IndexedDataset(base, num_negatives=8, mode="relax", seed=3)
    assert all(relax[i][3][0] % 4 == i % 4 for i in range(40))
    with pytest.raises(TypeError, match="has no 'targets'; pass labels="):
        IndexedDataset(list(zip(range(4), [0, 1, 0, 1])), num_negatives=2)
    assert IndexedDataset(list(zip(range(4), [0, 1, 0, 1])), num_negatives=2, labels=[0, 1, 0, 1])[2][3][0] == 2


def test_indexed_dataset_batches_draw_once_per_batch():
    base = _array_dataset()
    crd = IndexedDataset(base, num_negatives=5, seed=7)
    calls, draw = [], crd.sampler.__call__

    class Spy:
        generator = crd.sampler.generator

        def __call__(self, index, generator=None):
            calls.append(index.numel())
            return draw(index, generator)

    crd.sampler = Spy()
    loader = torch.utils.data.DataLoader(crd, batch_size=16, shuffle=False)
    batches = list(loader)
    assert calls == [16, 16, 8]
    images, labels, index, contrast = batches[1]
    assert images.shape == (16, 3, 4, 4) and index.tolist() == list(range(16, 32))
    assert contrast.shape == (16, 6) and torch.equal(contrast[:, 0], index)
    assert (labels[:, None] != torch.from_numpy(base.targets)[contrast[:, 1:]]).all()
    # the same seed replays the same draws
    twin = IndexedDataset(base, num_negatives=5, seed=7)
    assert torch.equal(torch.stack([row[3] for row in twin.__getitems__(range(16))]), batches[0][3])


def test_indexed_dataset_in_worker_processes_is_reproducible():
    base = _array_dataset(n=32)
    crd = IndexedDataset(base, num_negatives=6, seed=2)

    def run():
        torch.manual_seed(123)  # the loader derives its workers' seeds from the global RNG
        loader = torch.utils.data.DataLoader(crd, batch_size=4, num_workers=2, shuffle=False)
        return torch.cat([c for _, _, _, c in loader])

    first, second = run(), run()
    assert torch.equal(first, second) and first.shape == (32, 7)
    assert torch.equal(first[:, 0], torch.arange(32))
    assert (torch.from_numpy(base.targets)[first[:, 1:]] != (torch.arange(32) % 4)[:, None]).all()
    main_process = torch.cat([torch.stack([r[3] for r in crd.__getitems__(range(i, i + 4))]) for i in range(0, 32, 4)])
    assert not torch.equal(first, main_process)  # workers reseed rather than replay the parent's stream


# --- contrast sampler ------------------------------------------------------------------------------

def _check_rows(out, index, labels, k, mode, distinct=True):
    assert out.shape == (index.numel(), k + 1) and out.dtype == torch.int64
    y = labels[index]
    if mode == "exact":
        assert torch.equal(out[:, 0], index)
    else:
        assert torch.equal(labels[out[:, 0]], y)
    assert (labels[out[:, 1:]] != y[:, None]).all(), "a negative shares the anchor's class"
    if distinct:
        rows = out[:, 1:].sort(dim=1).values
        assert not (rows[:, 1:] == rows[:, :-1]).any(), "a row repeats a negative"


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_sampler_cifar_sized(mode):
    labels = torch.arange(50_000) % 10
    sampler = ContrastSampler(labels, 16384, mode, seed=0)
    index = torch.randperm(50_000, generator=torch.Generator().manual_seed(0))[:64]
    out = sampler(index)
    _check_rows(out, index, labels, 16384, mode)
    again = ContrastSampler(labels, 16384, mode, seed=0)(index)
    assert torch.equal(out, again)
    assert not torch.equal(out, ContrastSampler(labels, 16384, mode, seed=1)(index))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(sampler(index, torch.Generator().manual_seed(5)), sampler(index, g))
    if mode == "relax":
        assert (out[:, 0] != index).float().mean() > 0.9  # 5,000 samples per class: rarely itself


def test_sampler_unbalanced_classes_all_regimes():
    # pools: class 0 → 100 others, class 1 → 920, class 2 → 980
    labels = torch.cat([torch.zeros(900), torch.ones(80), torch.full((20,), 2)]).long()
    index = torch.cat([torch.arange(0, 900, 45), torch.arange(900, 980, 8), torch.arange(980, 1000, 4)])
    for k in (40, 60, 300, 600):  # sparse; dense for class 0; mixed with replacement; dense for 1 and 2
        for mode in ("exact", "relax"):
            out = ContrastSampler(labels, k, mode, seed=k)(index)
            replace = labels[index] == 0 if k > 100 else torch.zeros(index.numel(), dtype=torch.bool)
            _check_rows(out[~replace], index[~replace], labels, k, mode)
            _check_rows(out[replace], index[replace], labels, k, mode, distinct=False)
    chunked = ContrastSampler(labels, 40, seed=0)
    chunked._chunk_rows = 7  # big pools are drawn a few rows at a time
    _check_rows(chunked(index), index, labels, 40, "exact")
    out = ContrastSampler(labels, 300, seed=0)(torch.zeros(4, dtype=torch.long))
    assert set(out[:, 1:].flatten().tolist()) == set(range(900, 1000))  # 1,200 draws from a pool of 100


def test_sampler_rows_are_uniform_subsets():
    labels = torch.arange(12) % 3  # the pool of class 0: 8 samples; C(8, 3) = 56 subsets
    out = ContrastSampler(labels, 3, seed=1)(torch.zeros(20_000, dtype=torch.long))
    per_sample = torch.bincount(out[:, 1:].flatten(), minlength=12)
    assert per_sample[::3].sum() == 0
    assert per_sample[labels != 0].min() > 7000 and per_sample[labels != 0].max() < 8000  # 7,500 each
    code = (out[:, 1:].sort(dim=1).values * torch.tensor([144, 12, 1])).sum(1)
    counts = torch.bincount(code)
    counts = counts[counts > 0]
    assert counts.numel() == 56 and counts.min() > 250 and counts.max() < 470  # 357 ± 6σ
    positives = ContrastSampler(torch.arange(20) % 4, 2, "relax", seed=0)(torch.zeros(4000, dtype=torch.long))
    hits = torch.bincount(positives[:, 0], minlength=20)
    assert hits[labels.new_tensor([0, 4, 8, 12, 16])].min() > 680 and hits.sum() == 4000  # 800 each


def test_sampler_state_round_trip():
    sampler = ContrastSampler(torch.arange(30) % 3, 5, "relax", seed=4)
    index = torch.arange(0, 30, 2)
    sampler(index)
    state = sampler.state_dict()
    expected = sampler(index)
    sampler(index)
    sampler.load_state_dict(state)
    assert torch.equal(sampler(index), expected)


def test_sampler_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        ContrastSampler([0, 1], 1, "loose")
    with pytest.raises(ValueError, match="at least two classes"):
        ContrastSampler([3, 3, 3], 1)
    with pytest.raises(ValueError, match="num_negatives must be ≥ 1"):
        ContrastSampler([0, 1], 0)
    with pytest.raises(TypeError, match="labels must hold integers"):
        ContrastSampler([0.5, 1.0], 1)
    sampler = ContrastSampler([0, 1, 0, 1], 1)
    with pytest.raises(ValueError, match=r"index holds index 4, outside \[0, 4\)"):
        sampler(torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="index must have dtype torch.int64"):
        sampler(torch.tensor([0, 1], dtype=torch.int32))


# --- device-side augmentation ---------------------------------------------------------------------

def _reference_crop_flip(images, top, left, flip, padding):
    out = []
    for img, t, l, f in zip(images.numpy(), top.tolist(), left.tolist(), flip.tolist()):
        padded = np.pad(img, ((padding, padding), (padding, padding), (0, 0)))
        crop = padded[t:t + img.shape[0], l:l + img.shape[1]]
        out.append(crop[:, ::-1] if f else crop)
    return torch.from_numpy(np.stack(out))


def test_crop_flip_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (9, 7, 6, 3), dtype=torch.uint8, generator=g)
    top = torch.randint(0, 7, (9,), generator=g)
    left = torch.randint(0, 7, (9,), generator=g)
    flip = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    assert torch.equal(crop_flip(images, top, left, flip, 3), _reference_crop_flip(images, top, left, flip, 3))
    assert torch.equal(crop_flip(images, top * 0, left * 0, flip & False, 0), images)


def test_loader_matches_reference_loop_for_its_generator():
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    ds = DeviceDataset(data, np.arange(10) % 3, (120.0, 110.0, 100.0), (60.0, 50.0, 40.0))
    loader = DeviceLoader(ds, 4, seed=11)
    loader.set_epoch(3)
    batches = list(loader)
    assert loader.epoch == 4 and len(batches) == 3 and batches[-1][0].shape == (2, 3, 8, 8)
    g = loader.generator(3)
    order = torch.randperm(10, generator=g)
    mean, std = torch.tensor(ds.mean.tolist()).view(3, 1, 1), torch.tensor(ds.std.tolist()).view(3, 1, 1)
    for start, (images, labels, index) in zip(range(0, 10, 4), batches):
        expect_index = order[start:start + 4]
        b = expect_index.numel()
        top, left = torch.randint(0, 9, (b,), generator=g), torch.randint(0, 9, (b,), generator=g)
        flip = torch.randint(0, 2, (b,), generator=g).bool()
        crops = _reference_crop_flip(torch.from_numpy(data[expect_index.numpy()]), top, left, flip, 4)
        expected = torch.stack([(c.permute(2, 0, 1).float() - mean) / std for c in crops])
        assert torch.equal(index, expect_index) and torch.equal(labels, expect_index % 3)
        assert torch.equal(images, expected) and images.is_contiguous()


def test_loader_crop_offsets_and_flips_over_an_epoch():
    n, side, pad = 4096, 8, 4
    # pixel (r, c) holds (r, c, 255), so each crop tells where it came from; padding reads (0, 0, 0)
    grid = np.zeros((side, side, 3), dtype=np.uint8)
    grid[..., 0], grid[..., 1], grid[..., 2] = np.arange(side)[:, None], np.arange(side)[None, :], 255
    ds = DeviceDataset(np.broadcast_to(grid, (n, side, side, 3)).copy(), np.zeros(n, dtype=np.int64),
                       (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    images = torch.cat([x for x, _, _ in DeviceLoader(ds, 512, seed=0)])
    images = images.round().to(torch.uint8).permute(0, 2, 3, 1).reshape(n, -1)
    # every (top, left, flip) allowed by the padding, cropped by the reference loop
    span = 2 * pad + 1
    top, left = torch.arange(span).repeat_interleave(span).repeat(2), torch.arange(span).repeat(2 * span)
    flip = torch.arange(2).repeat_interleave(span * span).bool()
    candidates = _reference_crop_flip(torch.from_numpy(grid).expand(len(top), -1, -1, -1), top, left, flip, pad)
    match = (images[:, None, :] == candidates.reshape(1, len(top), -1)).all(dim=2)
    assert torch.equal(match.sum(dim=1), torch.ones(n, dtype=torch.long))  # each output is one allowed crop
    which = match.float().argmax(dim=1)
    assert abs(flip[which].float().mean().item() - 0.5) < 0.04  # 4,096 fair coins: σ ≈ 0.008
    offsets = torch.bincount(top[which] * span + left[which], minlength=span * span)
    assert offsets.min() > 15 and offsets.max() < 95  # 50.6 expected for each (top, left)


def test_loader_epochs_shuffle_drop_last_and_contrast():
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    ds = DeviceDataset(data, np.arange(10) % 2, (0.0,) * 3, (1.0,) * 3)
    loader = DeviceLoader(ds, 4, drop_last=True, seed=5)
    assert len(loader) == 2 and len(DeviceLoader(ds, 4)) == 3
    e0 = torch.cat([idx for _, _, idx in loader])
    e1 = torch.cat([idx for _, _, idx in loader])
    assert e0.numel() == 8 and e0.unique().numel() == 8 and not torch.equal(e0, e1)
    loader.set_epoch(0)
    assert torch.equal(torch.cat([idx for _, _, idx in loader]), e0)
    plain = list(DeviceLoader(ds, 6, shuffle=False, augment=False))
    assert torch.equal(plain[1][2], torch.arange(6, 10))
    assert torch.equal(plain[0][0], torch.from_numpy(data[:6]).permute(0, 3, 1, 2).float())
    sampler = ContrastSampler(ds.labels, 3, "exact")
    x, y, idx, contrast = next(iter(DeviceLoader(ds, 4, contrast=sampler, channels_last=True)))
    assert contrast.shape == (4, 4) and torch.equal(contrast[:, 0], idx)
    assert (ds.labels[contrast[:, 1:]] != y[:, None]).all()
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="contrast was built for 4 samples but the dataset has 10"):
        DeviceLoader(ds, 4, contrast=ContrastSampler([0, 1, 0, 1], 1))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        DeviceLoader(ds, 0)
    with pytest.raises(ValueError, match="images must be uint8"):
        DeviceDataset(data.astype(np.float32), np.zeros(10), (0.0,) * 3, (1.0,) * 3)


def test_digits_through_the_device_loader():
    train = Digits(size=8)
    ds = DeviceDataset.from_dataset(train)
    x, y, idx = next(iter(DeviceLoader(ds, 64, shuffle=False, augment=False)))
    assert torch.allclose(x, load_digits().x_train[:64], rtol=0, atol=1e-6)
    assert torch.equal(y, load_digits().y_train[:64])
