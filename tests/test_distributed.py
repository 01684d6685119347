"""torch.distributed: 2 gloo processes on CPU, spawned here, against one process on the global batch.

Each run trains a small student (no BatchNorm, so per-rank batch statistics cannot differ from
the global batch's) with CE + KD + CRD for a few epochs through the real engine and loaders.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastkd.data.device import DeviceDataset, DeviceLoader
from fastkd.data.keyed import EpochBatchSampler
from fastkd.train import distributed
from fastkd.train.distiller import Distiller
from fastkd.train.engine import Trainer
from fastkd.train.recipe import build, load_recipe

WORLD, PER_RANK, EPOCHS, N = 2, 8, 3, 64


class Plain(nn.Module):
    """features = [stem, stage, pooled], logits; no normalisation layers."""

    def __init__(self, width, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x, is_feat=False, preact=False):
        f0 = self.stem(x)
        f1 = self.stage(f0)
        pooled = f1.mean(dim=(2, 3))
        logits = self.fc(pooled)
        return ([f0, f1, pooled], logits) if is_feat else logits


def _dataset():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N, 8, 8, 3), generator=g, dtype=torch.uint8)
    bright = images.float().mean(dim=(1, 2)) > 127  # [N, 3]
    labels = bright[:, 0].long() + 2 * bright[:, 1].long()
    return DeviceDataset(images, labels, mean=(127.0,) * 3, std=(64.0,) * 3)


def _trainer(output, shard_banks=False, rank=0, world=1):
    crd = {"weight": 0.8, "num_negatives": 20, "feat_dim": 8, "shard_banks": shard_banks}
    recipe = build({"losses": {"ce": {"weight": 1.0}, "kd": {"weight": 0.9}, "crd": crd}, "epochs": EPOCHS,
                    "optim": {"lr": 0.1, "reference_batch": PER_RANK * WORLD}, "schedule": {"milestones": [2]},
                    "amp": "off", "output": str(output), "data": {"batch_size": PER_RANK * WORLD // world}})
    recipe = distributed.scaled_recipe(recipe)
    torch.manual_seed(0)
    teacher, student = Plain(12), Plain(6)
    data = _dataset()
    train = DeviceLoader(data, recipe.data.batch_size, padding=1, drop_last=True, seed=3, rank=rank, world_size=world)
    test = DeviceLoader(data, 24, shuffle=False, augment=False, rank=rank, world_size=world)
    sample = next(iter(DeviceLoader(data, 8, shuffle=False, augment=False)))[0]
    distiller = Distiller(student, teacher, recipe.losses, sample, num_data=N)
    return Trainer(recipe, distiller, train, test, output=str(output))


def _state(trainer):
    crd = trainer.distiller.criteria["crd"]
    student = trainer.distiller.student.state_dict()
    return {"history": trainer.history, "student": {k: v.clone() for k, v in student.items()},
            "embed": crd.embed_s.weight.detach().clone(), "memory_s": crd.memory_s.clone(),
            "memory_t": crd.memory_t.clone(), "z": (float(crd.z_s), float(crd.z_t)), "rng": crd.rng_state.clone(),
            "shard": (crd.shard_start, crd.shard_rows)}


class _DieAt:
    """The loader, but this process exits (as if killed) at (epoch, step)."""

    def __init__(self, loader, epoch, step):
        self.loader, self.at = loader, (epoch, step)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for step, batch in enumerate(self.loader):
            if (self.epoch, step) == self.at:
                os._exit(17)
            yield batch


def _worker(rank, world, store, jobs):
    """Runs ``jobs`` [(output, shard_banks, die_at, resume)] one after the other in this process."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    for output, shard_banks, die_at, resume in jobs:
        trainer = _trainer(output, shard_banks, rank, world)
        if resume:
            trainer.resume(os.path.join(output, "last.pt"))
        if die_at is not None and rank == 1:
            trainer.train_data = _DieAt(trainer.train_data, *die_at)
        trainer.fit(log=None)
        torch.save(_state(trainer), os.path.join(output, f"result{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn(tmp, name, jobs):
    """Runs ``jobs`` {output folder: (shard_banks, die_at, resume)} in one pair of processes; their results."""
    for output in jobs:
        output.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(WORLD, str(tmp / f"store-{name}"), [(str(o), *job) for o, job in jobs.items()]),
             nprocs=WORLD)
    return [[torch.load(output / f"result{r}.pt", weights_only=False) for r in range(WORLD)] for output in jobs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    single = _trainer(tmp / "single")
    single.fit(log=None)
    replicated, sharded = _spawn(tmp, "both", {tmp / "replicated": (False, None, False),
                                               tmp / "sharded": (True, None, False)})
    return {"single": _state(single), "replicated": replicated, "sharded": sharded, "tmp": tmp}


def _close(a, b, rel=1e-5):
    assert torch.allclose(a, b, rtol=rel, atol=rel * float(b.abs().max())), float((a - b).abs().max())


def test_banks_identical_on_every_rank_and_equal_to_one_process(runs):
    one, two = runs["replicated"]
    for key in ("memory_s", "memory_t", "rng", "embed"):
        assert torch.equal(one[key], two[key]), key
    assert one["z"] == two["z"]
    single = runs["single"]
    for key in ("memory_s", "memory_t", "embed"):
        _close(one[key], single[key])
    assert torch.equal(one["rng"], single["rng"]) and int(one["rng"][1]) == EPOCHS * N // (PER_RANK * WORLD)
    assert one["z"] == pytest.approx(single["z"], rel=1e-5)
    # every row was written (unit norm), unlike the uniform initialisation
    assert torch.allclose(one["memory_s"].norm(dim=1), torch.ones(N), atol=1e-5)


def test_loss_trajectory_matches_one_process_on_the_global_batch(runs):
    one, two = runs["replicated"]
    single = runs["single"]
    assert len(one["history"]) == EPOCHS
    for mine, ref in zip(one["history"], single["history"]):
        for key in ("train_loss", "train_ce", "train_kd", "train_crd", "test_top1"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-5), key
        assert mine["lr"] == pytest.approx(ref["lr"])
    for name, value in one["student"].items():
        _close(value, single["student"][name])
        assert torch.equal(value, two["student"][name])


def test_sharded_bank_gives_the_replicated_loss_and_banks(runs):
    sharded = runs["sharded"]
    replicated = runs["replicated"][0]
    for mine, ref in zip(sharded[0]["history"], replicated["history"]):
        for key in ("train_loss", "train_crd", "test_top1"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-5), key
    for name, value in sharded[0]["student"].items():
        _close(value, replicated["student"][name])
    _close(sharded[0]["embed"], replicated["embed"])
    for part in sharded:
        start, rows = part["shard"]
        assert rows == N // WORLD and part["memory_s"].shape[0] == rows + 1  # its rows and one spare
        for key in ("memory_s", "memory_t"):
            _close(part[key][:rows], replicated[key][start:start + rows])
        assert part["z"] == pytest.approx(replicated["z"], rel=1e-5)


def test_killed_rank_then_relaunch_resumes_with_nothing_lost(runs):
    tmp = runs["tmp"]
    output = tmp / "killed"
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        _spawn(tmp, "killed", {output: (True, (1, 2), False)})  # rank 1 dies in the 2nd epoch, step 3
    saved = torch.load(output / "last.pt", weights_only=False)
    assert saved["epoch"] == 1 and (output / "last.rank1.epoch1.pt").is_file()  # rank 1's bank shards
    (resumed,) = _spawn(tmp, "resumed", {output: (True, None, True)})
    uninterrupted = runs["sharded"]
    for mine, ref in zip(resumed, uninterrupted):
        assert [h["train_loss"] for h in mine["history"]] == [h["train_loss"] for h in ref["history"]]
        for key in ("memory_s", "memory_t", "rng", "embed"):
            assert torch.equal(mine[key], ref[key]), key
        for name, value in mine["student"].items():
            assert torch.equal(value, ref["student"][name]), name
    assert [p.name for p in sorted(output.glob("last*"))] == ["last.pt", f"last.rank1.epoch{EPOCHS}.pt"]


def test_sharded_batch_sampler_slices_one_global_order():
    def indices(sampler):
        return [[i for _, _, i in batch] for batch in sampler]

    whole = indices(EpochBatchSampler(10, 4, shuffle=True, drop_last=False, seed=5))
    parts = [EpochBatchSampler(10, 2, shuffle=True, drop_last=False, seed=5, rank=r, world_size=2) for r in range(2)]
    merged = [a + b for a, b in zip(*[indices(p) for p in parts])]
    assert len(merged) == 2 and merged == whole[:2]
    assert sorted(sum(whole, [])) == list(range(10)) and len(parts[0]) == 3
    steps = [[batch[0][1] for batch in p] for p in parts]  # each slice its own random stream
    assert steps == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(10, 2, shuffle=False, drop_last=True, rank=2, world_size=2)


def test_linear_learning_rate_scaling_and_imagenet_recipes():
    recipe = build({"optim": {"lr": 0.1, "reference_batch": 256}, "data": {"batch_size": 64}})
    assert distributed.scaled_recipe(recipe).optim.lr == pytest.approx(0.1 * 64 / 256)  # world of one
    assert distributed.scaled_recipe(build({"optim": {"lr": 0.1}})).optim.lr == 0.1
    expect = {"imagenet_r34_r18": ("resnet34", "resnet18", {"ce", "kd", "crd"}),
              "imagenet_r34_r18_kd": ("resnet34", "resnet18", {"ce", "kd"}),
              "imagenet_r50_mobilenet": ("resnet50", "mobilenet_v1", {"ce", "kd", "crd"}),
              "imagenet_r50_mobilenet_kd": ("resnet50", "mobilenet_v1", {"ce", "kd"})}
    for name, (teacher, student, losses) in expect.items():
        recipe = load_recipe(name, ["data.batch_size=32"])
        assert (recipe.teacher.name, recipe.student.name, set(recipe.losses)) == (teacher, student, losses)
        assert (recipe.epochs, recipe.schedule.milestones, recipe.optim.weight_decay) == (100, [30, 60, 90], 1e-4)
        assert distributed.scaled_recipe(recipe).optim.lr == pytest.approx(0.1 * 32 / 256)


def test_device_loader_ranks_slice_the_one_process_batches():
    from fastkd.data.contrast import ContrastSampler

    data = _dataset()
    contrast = ContrastSampler(data.labels, 5, "exact", seed=2)
    whole = DeviceLoader(data, 2 * 5, contrast=contrast, seed=4, drop_last=True)
    parts = [DeviceLoader(data, 5, contrast=contrast, seed=4, drop_last=True, rank=r, world_size=2) for r in range(2)]
    assert len(whole) == len(parts[0]) == N // 10
    for one, *two in zip(whole, *parts):
        for a, b0, b1 in zip(one, *two):
            assert torch.equal(a, torch.cat([b0, b1]))  # images (cropped, flipped), labels, indices, contrast rows
    test = [list(DeviceLoader(data, 24, shuffle=False, augment=False, rank=r, world_size=2)) for r in range(2)]
    seen = torch.cat([b[2] for part in test for b in part])
    assert sorted(seen.tolist()) == list(range(N))  # evaluation: every sample once, the short batch split
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(data, 5, rank=2, world_size=2)


def test_torchrun_cli_two_processes(tmp_path):
    """`torchrun --nproc_per_node=2 -m fastkd train ...`: one log, one set of files, from rank 0."""
    import subprocess
    import sys

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastkd", "train",
         "digits", "student.name=resnet8", "epochs=1", "data.batch_size=128", "optim.reference_batch=128",
         "--output", str(out), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch=1 ") == 1 and done.stdout.count("top-1") == 1  # rank 0 alone prints
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and (out / "last.pt").is_file() and not list(out.glob("last.rank*"))
    saved = torch.load(out / "last.pt", weights_only=False)
    # linear scaling: lr × (2 processes × 128) / 128
    assert saved["epoch"] == 1 and saved["recipe"]["optim"]["lr"] == pytest.approx(2 * load_recipe("digits").optim.lr)
