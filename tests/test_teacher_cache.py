"""The teacher cache (fastkd.train.teacher_cache, fastkd cache-teacher, teacher.cache=DIR): a cached run is the
live run bit for bit, a cache that does not match a run is refused with the reason, top-k is an approximation
that says how far it is, writing is atomic and resumable. Embedded digits at 8x8, resnet8 networks: seconds."""
import json
import math
import os

import pytest
import torch
import yaml

from fastkd import models
from fastkd.cli import main
from fastkd.train.cache_teacher import cache_teacher
from fastkd.train.recipe import load_recipe
from fastkd.train.run import make_trainer
from fastkd.train.teacher_cache import TeacherCache, decode_topk, encode_topk, shard_name, topk_error

KD = "losses={ce: 0.1, kd: 0.9}"
CRD_KD = "losses={ce: 1.0, kd: 1.0, crd: {weight: 0.8, num_negatives: 32, feat_dim: 16}}"
BASE = ["teacher.name=resnet8", "data.image_size=8", "epochs=2", "data.batch_size=128", "optim.lr=0.1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the shared 2-core CI machine two OpenMP threads of these tiny networks wait on each
    other (measured 50x slower under load); the comparisons hold at any thread count, one process throughout."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher checkpoint (untrained: its outputs only have to be the same in both runs)."""
    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    torch.manual_seed(5)
    torch.save({"model": models.create("resnet8", num_classes=10).state_dict()}, path)
    return str(path)


def recipe(*overrides):
    return load_recipe("digits", [*BASE, *overrides])


def trained(rec, output):
    trainer = make_trainer(rec, device="cpu", output=str(output))
    trainer.fit(log=None)
    return trainer


@pytest.fixture(scope="module")
def kd_cache(tmp_path_factory, teacher):
    folder = tmp_path_factory.mktemp("cache") / "kd"
    cache_teacher(recipe(KD, f"teacher.checkpoint={teacher}"), str(folder), 2, log=None)
    return str(folder)


@pytest.mark.parametrize("losses", [KD, CRD_KD + " ", CRD_KD], ids=["kd", "crd_kd", "crd_kd_contrast"])
def test_cached_run_equals_the_live_run_bit_for_bit(losses, teacher, tmp_path):
    extra = ["data.contrast_mode=exact"] if losses == CRD_KD else []
    live = trained(recipe(losses, f"teacher.checkpoint={teacher}", *extra), tmp_path / "live")
    cache_teacher(recipe(losses, f"teacher.checkpoint={teacher}", *extra), str(tmp_path / "cache"), 2, log=None)
    cached = trained(recipe(losses, f"teacher.cache={tmp_path / 'cache'}", *extra), tmp_path / "cached")
    assert cached.distiller.teacher is None and cached.distiller.teacher_cache is not None  # never built
    assert [h["train_loss"] for h in cached.history] == [h["train_loss"] for h in live.history]
    for key, value in live.distiller.student.state_dict().items():
        assert torch.equal(cached.distiller.student.state_dict()[key], value), key
    for key, value in live.distiller.criteria.state_dict().items():  # CRD's embeds, banks, Z, sampler offset
        assert torch.equal(cached.distiller.criteria.state_dict()[key], value), key
    assert cached.teacher_eval == pytest.approx(live.teacher_eval)  # measured by cache-teacher, logged by the run


def test_cached_run_resumes_exactly(kd_cache, tmp_path):
    straight = trained(recipe(KD, f"teacher.cache={kd_cache}"), tmp_path / "straight")
    cut = make_trainer(recipe(KD, f"teacher.cache={kd_cache}"), device="cpu", output=str(tmp_path / "cut"))
    cut.fit(epochs=1, log=None)
    resumed = make_trainer(recipe(KD, f"teacher.cache={kd_cache}"), device="cpu", output=str(tmp_path / "other"))
    resumed.resume(str(tmp_path / "cut" / "last.pt"))
    resumed.fit(log=None)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    for key, value in straight.distiller.student.state_dict().items():
        assert torch.equal(resumed.distiller.student.state_dict()[key], value), key


@pytest.mark.parametrize("overrides, reason", [
    (["seed=1"], "seed is 0 in the cache, 1 in this run"),
    (["data.device_augment=false"], "data_fingerprint.augmentation.augment is True in the cache, False in this run"),
    (["data.image_size=16"], "data.image_size is 8 in the cache, 16 in this run; data_fingerprint.images is"),
    (["data.batch_size=64"], "batch_size is 128 in the cache, 64 in this run"),
    (["epochs=3"], "trains 3 epochs .* the cache holds 2"),
    (["teacher.name=resnet14"], "the teacher is a resnet8 in the cache, a resnet14 in this run"),
    ([CRD_KD], r"the crd loss reads pooled_t of the teacher, and the cache does not hold feature.4"),
    (["losses={ce: 1.0, sskd: 1.0}"], "run in the sskd_student objective"),
])
def test_a_cache_that_does_not_match_is_refused_before_training(kd_cache, overrides, reason, tmp_path):
    with pytest.raises(ValueError, match=reason):
        make_trainer(recipe(KD, f"teacher.cache={kd_cache}", *overrides), device="cpu", output=str(tmp_path))
    assert not os.path.exists(tmp_path / "last.pt")


def test_another_teacher_checkpoint_is_refused(kd_cache, tmp_path):
    other = tmp_path / "other.pt"
    torch.manual_seed(6)
    torch.save({"model": models.create("resnet8", num_classes=10).state_dict()}, other)
    with pytest.raises(ValueError, match="teacher.checkpoint holds other weights"):
        make_trainer(recipe(KD, f"teacher.cache={kd_cache}", f"teacher.checkpoint={other}"), device="cpu",
                     output=str(tmp_path / "run"))


def test_a_batch_the_cache_was_not_made_from_is_refused(kd_cache):
    cache = TeacherCache(kd_cache)
    record = cache.shard(0).raw(0)
    images = torch.zeros(128, 3, 8, 8)
    with pytest.raises(ValueError, match="holds other samples"):
        cache.verify(0, 0, images, record["index"].flip(0))
    with pytest.raises(ValueError, match="differ from those the cache's teacher saw"):
        cache.verify(0, 0, images, record["index"].clone())
    with pytest.raises(ValueError, match="holds no epoch 5"):
        cache.shard(5)
    with pytest.raises(ValueError, match="not a teacher cache"):
        TeacherCache(os.path.dirname(kd_cache))


def test_topk_keeps_the_top_probabilities_and_the_remaining_mass_exactly():
    torch.manual_seed(0)
    logits = torch.randn(16, 100, dtype=torch.float64) * 3
    for t in (1.0, 4.0):
        values, indices, fill = encode_topk(logits, 10, t)
        approx = decode_topk(values, indices, fill.double(), 100)
        p, q = torch.softmax(logits / t, 1), torch.softmax(approx / t, 1)
        assert torch.allclose(q.gather(1, indices), p.gather(1, indices), rtol=1e-6)  # fill kept in fp32
        rest = torch.ones_like(p, dtype=torch.bool).scatter_(1, indices, False)
        assert torch.allclose((q * rest).sum(1), (p * rest).sum(1), rtol=1e-6)
        mass, kl = topk_error(logits, approx, t)
        assert torch.allclose(mass, (p * rest).sum(1)) and (kl >= 0).all() and kl.max() > 0
        expect = (p * (p.log() - q.log())).sum(1) * t * t
        assert torch.allclose(kl, expect)


def test_topk_cache_reports_its_difference_and_keeps_its_temperature(teacher, tmp_path):
    cache = cache_teacher(recipe(KD, f"teacher.checkpoint={teacher}"), str(tmp_path / "top3"), 1, topk=3,
                          feature_dtype="bfloat16", features=["pooled_t"], log=None)
    error = cache.shard(0).header["topk_error"]
    assert 0 < error["mass_mean"] < 1 and 0 < error["kl_mean"] <= error["kl_max"]
    assert cache.stores["topk"] == {"k": 3, "temperature": 4.0} and "crd" in cache.manifest["serves"]
    assert "top-3 logits at T=4 (approximate): the remaining mass averages" in cache.summary()
    record = cache.read(0, 0)
    assert record["logits"].shape == (128, 10) and record["logits"].dtype == torch.float32
    assert record["feature.4"].dtype == torch.float32  # stored in bf16, read at the compute dtype
    live = cache_teacher(recipe(KD, f"teacher.checkpoint={teacher}"), str(tmp_path / "full"), 1, log=None)
    full = live.read(0, 0)
    top = full["logits"].topk(3, dim=1)
    assert torch.equal(record["logits"].gather(1, top.indices), top.values)
    assert not torch.equal(record["logits"], full["logits"])
    run = make_trainer(recipe(KD, f"teacher.cache={tmp_path / 'top3'}", "epochs=1"), device="cpu",
                       output=str(tmp_path / "run"))
    run.fit(log=None)
    assert math.isfinite(run.history[-1]["train_loss"])
    with pytest.raises(ValueError, match="reads the logits at temperature 1, and the cache keeps the top-3"):
        make_trainer(recipe("losses={ce: 0.1, kd: {weight: 0.9, temperature: 1.0}}", "epochs=1",
                            f"teacher.cache={tmp_path / 'top3'}"), device="cpu", output=str(tmp_path / "t1"))


def test_interrupted_cache_resumes_at_the_first_unfinished_epoch(teacher, tmp_path, monkeypatch):
    from fastkd.train import cache_teacher as module

    folder = tmp_path / "cache"
    real, calls = module._write_epoch, []

    def dies_in_epoch_2(path, *args):
        calls.append(os.path.basename(path))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(module, "_write_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(recipe(KD, f"teacher.checkpoint={teacher}"), str(folder), 3, log=None)
    assert sorted(os.listdir(folder)) == ["epoch-0000.rank-0.bin", "manifest.json"]  # nothing half-written
    first = os.stat(folder / shard_name(0, 0)).st_mtime_ns
    calls.clear()
    monkeypatch.setattr(module, "_write_epoch", lambda path, *args: calls.append(os.path.basename(path)) or real(path, *args))
    cache = cache_teacher(recipe(KD, f"teacher.checkpoint={teacher}"), str(folder), 3, log=None)
    assert calls == [shard_name(1, 0), shard_name(2, 0)] and cache.epochs() == 3
    assert os.stat(folder / shard_name(0, 0)).st_mtime_ns == first
    with pytest.raises(ValueError, match="holds the teacher cache of another run"):
        cache_teacher(recipe(KD, f"teacher.checkpoint={teacher}", "seed=3"), str(folder), 1, log=None)


def test_cli_cache_teacher_then_distill_and_sweep(teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = str(tmp_path / "cache")
    common = ["digits", KD, *BASE, "epochs=1"]
    assert main(["cache-teacher", *common, f"teacher.checkpoint={teacher}", "--epochs", "1", "--output", cache,
                 "--features", "pooled_t"]) == 0
    out = capsys.readouterr().out
    assert "per epoch and rank: 10 steps x 128 samples" in out and "serves" in out and "crd" in out
    assert "resnet8's logits, feature.4, features exact, full logits: exact" in out
    assert main(["distill", *common, f"teacher.cache={cache}", "--output", "run", "--device", "cpu"]) == 0
    described = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))["run"]["describes"]
    assert described["teacher_cache[digest]"] == json.load(open(os.path.join(cache, "manifest.json")))["digest"]
    assert main(["sweep", "digits", *BASE[1:], "epochs=1", "teacher.name=resnet8", KD, "--cache", cache,
                 "--device", "cpu"]) == 0
    assert "resnet8 + KD" in capsys.readouterr().out
    assert main(["distill", *common, f"teacher.cache={cache}", "seed=2", "--output", "bad", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastkd: error: teacher.cache") and "seed is 0 in the cache, 2 in this run" in err
    assert main(["cache-teacher", *common, "--epochs", "1", "--output", str(tmp_path / "x")]) == 2
    assert "set teacher.name and teacher.checkpoint" in capsys.readouterr().err


def test_torchrun_ranks_write_their_slices_of_the_one_process_batches(teacher, tmp_path):
    """`torchrun --nproc_per_node=2 -m fastkd cache-teacher`: each rank writes its shard, rows [r·b, (r+1)·b) of
    the batches one process writes at batch 2·b, with the same teacher outputs."""
    import subprocess
    import sys

    common = ["digits", KD, *BASE, f"teacher.checkpoint={teacher}", "--epochs", "1", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "fastkd", "cache-teacher", *common, "data.batch_size=64", "--output", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("teacher cache ") == 1  # rank 0 alone prints
    one = cache_teacher(recipe(KD, f"teacher.checkpoint={teacher}"), str(tmp_path / "one"), 1, log=None)
    two = TeacherCache(str(tmp_path / "two"))
    assert two.world_size == 2 and two.epochs(0) == two.epochs(1) == 1
    for step in range(one.shard(0).steps):
        whole = one.shard(0).raw(step)
        halves = [two.shard(0, rank).raw(step) for rank in (0, 1)]
        assert torch.equal(torch.cat([h["index"] for h in halves]), whole["index"])
        assert torch.allclose(torch.cat([h["logits"] for h in halves]), whole["logits"], rtol=1e-5, atol=1e-6)


def test_streamed_image_tree_cached_run_equals_the_live_run(tmp_path):
    """Worker-fed batches (an image tree on disk, random-resized crops and flips drawn per (seed, epoch, step))."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(12 if split == "train" else 3):
                pixels = rng.integers(0, 80, (30 + i, 40, 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(tmp_path / "tree" / split / name / f"{i}.png")
    torch.manual_seed(3)
    torch.save({"model": models.create("resnet8", num_classes=2).state_dict()}, tmp_path / "t.pt")
    common = [f"data.root={tmp_path / 'tree'}", "data.image_size=16", "data.batch_size=6", "data.num_workers=2",
              "teacher.name=resnet8", "student.name=resnet8", "epochs=2", "schedule.milestones=[10]"]
    live = trained(load_recipe("imagenet_r34_r18_kd", [*common, f"teacher.checkpoint={tmp_path / 't.pt'}"]),
                   tmp_path / "live")
    live.close()
    cache_teacher(load_recipe("imagenet_r34_r18_kd", [*common, f"teacher.checkpoint={tmp_path / 't.pt'}"]),
                  str(tmp_path / "cache"), 2, log=None)
    cached = trained(load_recipe("imagenet_r34_r18_kd", [*common, f"teacher.cache={tmp_path / 'cache'}"]),
                     tmp_path / "cached")
    cached.close()
    assert [h["train_loss"] for h in cached.history] == [h["train_loss"] for h in live.history]
    for key, value in live.distiller.student.state_dict().items():
        assert torch.equal(cached.distiller.student.state_dict()[key], value), key


def test_cross_modal_cached_run_equals_the_live_run(tmp_path):
    """A cross-modal run (the teacher reads L, the student ab of the same crop): cache-teacher runs the teacher on
    its own view, so the cached run is the live run; the teacher's view is part of what the cache must match."""
    torch.manual_seed(3)
    teacher = models.create("resnet8", num_classes=10)
    from fastkd.models.inputs import read_view

    read_view(teacher, slice(0, 1), 3)  # a network that reads one channel (L) of a 3-channel stack
    path = tmp_path / "t.pt"
    torch.save({"model": teacher.state_dict()}, path)

    def xmodal(*overrides):
        return load_recipe("digits_crossmodal_l2ab_crd", ["teacher.name=resnet8", "data.image_size=8", "epochs=1",
                                                         "data.batch_size=128", "losses.crd.num_negatives=32",
                                                         "losses.crd.feat_dim=16", *overrides])

    live = trained(xmodal(f"teacher.checkpoint={path}"), tmp_path / "live")
    cache_teacher(xmodal(f"teacher.checkpoint={path}"), str(tmp_path / "cache"), 1, log=None)
    cached = trained(xmodal(f"teacher.cache={tmp_path / 'cache'}"), tmp_path / "cached")
    assert [h["train_loss"] for h in cached.history] == [h["train_loss"] for h in live.history]
    for key, value in live.distiller.student.state_dict().items():
        assert torch.equal(cached.distiller.student.state_dict()[key], value), key
    with pytest.raises(ValueError, match="teacher_view"):
        make_trainer(xmodal(f"teacher.cache={tmp_path / 'cache'}", "data.teacher_view=ab"), device="cpu",
                     output=str(tmp_path / "other"))
