"""The teacher computed once: its outputs on the exact batches of a run, stored, and read back.

In offline distillation the teacher is frozen, yet every epoch of every run pays its forward pass
again. fastkd's batches and augmentations are a pure function of (seed, epoch, step, index)
(:mod:`fastkd.data.device`, :mod:`fastkd.data.keyed`), so what the teacher will see at every step of
every future epoch is known in advance: ``fastkd cache-teacher`` (:mod:`fastkd.train.cache_teacher`)
runs the teacher once over those batches and stores what the recipe's losses read from it, and a run
with ``teacher.cache=DIR`` reads them instead of building and running the teacher. Unlike a cache of
one output per sample (torchdistill, which then pairs a student's crop with another crop's teacher
output), every stored output belongs to the very crop the student sees at that step.

What is stored, per sample: the teacher's logits and the entries of its RepDistiller feature list
that the losses' views (:data:`fastkd.train.distiller._VIEWS`) read — ``pooled`` for CRD / SRD / CC /
RKD / PKT, ``last_block`` for SP / FT, the block outputs for AT / NST / VID... — plus the sample's
dataset index and two checksums of its input image, by which each epoch's first batch is verified.
By default everything is kept exactly, at the dtype the live run computes it in, so a cached run
*is* the live run, bit for bit. Options keep less:

* ``topk=k``: the k largest logits (values, and their class indices as int16 / int32) and one number
  per row, ``fill = T·(log Σ_{j∉top-k} exp(z_j/T) − log(C − k))``: every other class gets the logit
  ``fill``, so the teacher's softmax at temperature ``T`` keeps the k largest probabilities exactly and
  gives the remaining mass R exactly too, spread evenly over the other C − k classes. KD at that T
  then differs from the full teacher's only by how R is spread: its target differs from the true one
  by KL(p_t ‖ p̂_t) (reported per epoch by ``cache-teacher`` and by the run), and its gradient by at
  most R per row. The cache serves losses at that temperature only (another T would change R): a run
  whose logit losses use another temperature is refused.
* ``feature_dtype="float16" / "bfloat16"``: the features rounded to half precision (read back at the
  compute dtype): half the bytes, no longer the live run.

Layout of a cache folder::

    manifest.json              what the cache is (below), written atomically by rank 0
    epoch-0000.rank-0.bin      one file per epoch and rank: a 4,096-byte header (JSON: the manifest's
    epoch-0001.rank-0.bin      digest, epoch, rank, steps, statistics), then one record per step of
    ...                        that rank's batches, each field [B, ...] at a 64-byte aligned offset

A shard file appears complete or not at all (written to a temporary file, then renamed:
:func:`fastkd.data._files.atomic_write`), so an interrupted ``cache-teacher`` resumes at the first
epoch it had not finished. Files are read memory-mapped, one contiguous record per step.

The manifest names what the cache was made for — the recipe, the teacher (name and a digest of its
weights), the data (a fingerprint of the training images and labels, the normalisation), the
augmentation, the seed, batch size and world size, the compute dtype, the memory format — and what it
stores (fields, top-k, feature dtype) and so which losses it serves. :meth:`TeacherCache.problems`
compares a run with it; a run that differs in anything that changes what the teacher sees or computes,
that needs an epoch or a feature the cache does not hold, is refused before it trains, with the reason.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fastkd.losses import FEATURES, entry, registered

FORMAT = 1
MANIFEST = "manifest.json"
HEADER_BYTES = 4096
ALIGN = 64  # every field's offset in a record: the alignment torch's CPU allocator gives a tensor
MAGIC = b"fastkd teacher cache\n"
# the feature views a cache can hold: the Distiller's views of the teacher's feature list, and its logits
CACHEABLE = ("logits", "blocks", "maps", "last_block", "hint_layer", "pooled")
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                       torch.int16, torch.int32, torch.int64)}
HALF = ("float16", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shard_name(epoch: int, rank: int) -> str:
    """The file of ``epoch``'s batches of ``rank``."""
    return f"epoch-{epoch:04d}.rank-{rank}.bin"


def digest_of(value: Any) -> str:
    """``sha256:`` + 16 hex digits of a JSON value (keys sorted)."""
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- what a run reads from its teacher ----------------------------------------------------------------
def teacher_needs(losses: Mapping[str, Mapping]) -> dict[str, list[str]]:
    """{loss key: the teacher features it takes} for a recipe's ``losses`` (``ce`` and losses that take
    nothing of the teacher left out). ``ValueError`` for a loss whose teacher outputs a cache cannot hold
    (SSKD's rotated views, STKD's mixed batch: the teacher runs on inputs made inside the objective)."""
    needs = {}
    for key in losses:
        if key == "ce":
            continue
        loss = entry(key)
        names = [n for n in dict.fromkeys((*loss.takes, *loss.init_takes)) if FEATURES[n].side == "teacher"]
        if not names:
            continue
        bad = [n for n in names if not n.endswith("_t") or n[:-2] not in CACHEABLE]
        if bad or loss.objective != "offline":
            raise ValueError(f"the {key} loss takes {', '.join(bad or names)} from the teacher, computed inside the "
                             f"{loss.objective} objective on inputs it makes itself: a teacher cache cannot hold it "
                             "(teacher.cache serves the offline losses: KD, DKD, CRD, SRD, SP, AT, ...)")
        needs[key] = names
    return needs


def slots(names: Iterable[str], num_features: int, hint_layer: int = 2) -> list:
    """The entries of the teacher's output that the teacher features ``names`` read: ``"logits"`` and
    positions in its feature list (see :data:`fastkd.train.distiller._VIEWS`), sorted."""
    found: set = set()
    last = num_features - 1
    for name in names:
        view = name[:-2]
        if view == "logits":
            found.add("logits")
        elif view == "blocks":
            found.update(range(1, last))
        elif view == "maps":
            found.update(range(0, last))
        elif view == "last_block":
            found.add(last - 1)
        elif view == "hint_layer":
            found.add(hint_layer % num_features)
        elif view == "pooled":
            found.add(last)
        else:
            raise ValueError(f"{name!r} is not a teacher output a cache holds ({', '.join(v + '_t' for v in CACHEABLE)})")
    return sorted(found, key=lambda s: (-1,) if s == "logits" else (s,))


def slot_field(slot) -> str:
    return "logits" if slot == "logits" else f"feature.{slot}"


def serves(stored: Sequence, num_features: int) -> list[str]:
    """The registered offline losses whose teacher needs the stored slots cover (a top-k cache serves the
    logit losses at its temperature only: :meth:`TeacherCache.problems` checks that per run)."""
    keys = []
    for key, loss in registered().items():
        try:
            needs = teacher_needs({key: {}}).get(key)
        except ValueError:
            continue
        if needs and set(slots(needs, num_features)) <= set(stored):
            keys.append(key)
    return keys


# --- input checksums ----------------------------------------------------------------------------------
def checksums(images: torch.Tensor) -> torch.Tensor:
    """Two float64 numbers per image: the sum of its values and their sum weighted by a ramp over the
    flattened (C, H, W) positions (a mirrored or shifted crop changes the second). They identify the input
    the teacher saw; compared with a relative tolerance (the summation order may differ by thread count)."""
    x = images.detach().to(torch.float64).reshape(images.shape[0], -1)
    ramp = torch.linspace(0.0, 1.0, x.shape[1], dtype=torch.float64, device=x.device)
    return torch.stack([x.sum(1), (x * ramp).sum(1)], dim=1)


# --- the record layout ----------------------------------------------------------------------------------
def layout(fields: Sequence[dict], batch: int) -> tuple[list[dict], int]:
    """``fields`` (name, dtype, shape per sample) with their byte offset in a record of ``batch`` samples,
    each aligned to :data:`ALIGN`; and the record's size."""
    placed, offset = [], 0
    for f in fields:
        size = batch * math.prod(f["shape"]) * DTYPES[f["dtype"]].itemsize
        placed.append({**f, "offset": offset, "bytes": size})
        offset += -(-size // ALIGN) * ALIGN
    return placed, offset


def topk_fields(k: int, classes: int, dtype: str) -> list[dict]:
    index = "int16" if classes <= 32767 else "int32"
    return [{"name": "logits.values", "dtype": dtype, "shape": [k]},
            {"name": "logits.indices", "dtype": index, "shape": [k]},
            {"name": "logits.fill", "dtype": "float32", "shape": []}]


def encode_topk(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [B, k], indices [B, k], fill [B]) of ``logits``; see the module doc for ``fill``."""
    values, indices = logits.topk(k, dim=1)
    z = logits.detach().to(torch.float64) / temperature
    rest = z.scatter(1, indices, float("-inf"))
    fill = temperature * (torch.logsumexp(rest, dim=1) - math.log(logits.shape[1] - k))
    return values, indices, fill.to(torch.float32)


def decode_topk(values: torch.Tensor, indices: torch.Tensor, fill: torch.Tensor, classes: int) -> torch.Tensor:
    """The logits a top-k record stands for: ``fill`` everywhere, the stored values at their classes."""
    full = fill.to(values.dtype)[:, None].expand(-1, classes).clone()
    return full.scatter_(1, indices.long(), values)


def topk_error(logits: torch.Tensor, approx: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the probability mass R outside the top-k at ``temperature``, and T²·KL(p_t ‖ p̂_t), the KD
    target's error (what a student matching the true teacher exactly would still be charged)."""
    t = temperature
    log_p = torch.log_softmax(logits.to(torch.float64) / t, dim=1)
    log_q = torch.log_softmax(approx.to(torch.float64) / t, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1) * t * t
    rest = approx.to(torch.float64) != logits.to(torch.float64)
    mass = (log_p.exp() * rest).sum(1)
    return mass, kl


def _differences(a: Mapping, b: Mapping, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in ``a``, value in ``b``) for every leaf that differs."""
    found = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            found += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            found.append((f"{prefix}{key}", x, y))
    return found


# --- reading ------------------------------------------------------------------------------------------
class Shard:
    """One epoch file of one rank, memory-mapped: :meth:`read` returns a step's fields."""

    def __init__(self, path: str, header: dict, fields: list[dict], batch: int):
        self.path, self.header, self.fields, self.batch = path, header, fields, batch
        self.steps, self.record = int(header["steps"]), int(header["record_bytes"])
        size = HEADER_BYTES + self.steps * self.record
        self.data = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)

    def raw(self, step: int) -> dict[str, torch.Tensor]:
        """The step's fields as views of the mapped file (no copy)."""
        if not 0 <= step < self.steps:
            raise IndexError(f"{self.path} holds {self.steps} steps, not step {step}")
        start = HEADER_BYTES + step * self.record
        out = {}
        for f in self.fields:
            part = self.data[start + f["offset"]:start + f["offset"] + f["bytes"]]
            out[f["name"]] = part.view(DTYPES[f["dtype"]]).view(self.batch, *f["shape"])
        return out


def read_header(path: str) -> dict:
    """A shard file's header (JSON), or ``ValueError`` for a file that is not one."""
    with open(path, "rb") as stream:
        head = stream.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        raise ValueError(f"{path} is not a teacher-cache shard (no header): delete it and run cache-teacher again")
    return json.loads(head[len(MAGIC):].rstrip(b"\0 ").decode())


def write_header(stream, header: dict) -> None:
    data = MAGIC + json.dumps(header, sort_keys=True).encode()
    if len(data) > HEADER_BYTES:
        raise ValueError(f"a shard header of {len(data)} bytes does not fit in {HEADER_BYTES}")
    stream.write(data + b"\0" * (HEADER_BYTES - len(data)))


class TeacherCache:
    """A cache folder written by ``fastkd cache-teacher``, opened for reading; see the module doc.

    ``TeacherCache(folder)`` reads and checks its manifest. :meth:`problems` says why a run cannot use
    it; :meth:`batches` wraps a run's train loader so that each batch carries the teacher's outputs;
    :meth:`probe` gives outputs to build the losses from.
    """

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)
        path = os.path.join(self.folder, MANIFEST)
        if not os.path.isfile(path):
            raise ValueError(f"teacher.cache {self.folder} holds no {MANIFEST}: it is not a teacher cache (make one "
                             "with: fastkd cache-teacher RECIPE [overrides] --epochs E --output DIR)")
        try:
            with open(path) as stream:
                self.manifest = json.load(stream)
        except (OSError, ValueError) as exc:
            raise ValueError(f"teacher.cache {path} cannot be read ({exc}): write the cache again") from None
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"teacher.cache {self.folder} has format {self.manifest.get('format')!r}; this fastkd "
                             f"reads format {FORMAT}: write the cache again with this version")
        m = self.manifest
        self.digest = m["digest"]
        self.describes, self.stores = m["describes"], m["stores"]
        self.batch, self.world_size = self.describes["batch_size"], self.describes["world_size"]
        self.num_features, self.classes = self.stores["num_features"], self.stores["classes"]
        self.slots = [s if s == "logits" else int(s) for s in self.stores["slots"]]
        self.fields, self.record_bytes = layout(self.stores["fields"], self.batch)
        self.topk = self.stores.get("topk")
        self.logits_dtype = DTYPES[self.stores["logits_dtype"]]
        self.feature_dtypes = {int(k): DTYPES[v] for k, v in self.stores["feature_dtypes"].items()}
        self.compute_dtype = DTYPES[self.describes["compute_dtype"]]
        self.channels_last = {int(k) for k, v in self.stores.get("feature_formats", {}).items() if v == "channels_last"}
        self._shards: dict[tuple[int, int], Shard] = {}

    def summary(self, epochs: int | None = None, rank: int = 0) -> str:
        """One line on what the cache stores and, for top-k logits, how far it is from the full teacher over
        its first ``epochs`` epochs (all it holds by default)."""
        kept = ", ".join(slot_field(s) for s in self.slots)
        line = (f"teacher cache {self.folder} ({self.digest}): {self.describes['teacher']['name']}'s {kept}, "
                f"features {self.stores.get('feature_storage', 'exact')}")
        if self.topk is None:
            return line + ", full logits: exact"
        held = self.epochs(rank) if epochs is None else epochs
        stats = self.statistics(held, rank)
        return (line + f"; top-{self.topk['k']} logits at T={self.topk['temperature']:g} (approximate): the remaining "
                f"mass averages {stats.get('mass_mean', float('nan')):.4g}, the KD target's error T²·KL(p_t ‖ p̂_t) "
                f"averages {stats.get('kl_mean', float('nan')):.3g} per sample (largest {stats.get('kl_max', float('nan')):.3g}) "
                f"over epochs 1..{held}")

    def __repr__(self) -> str:
        return f"TeacherCache({self.folder!r}, teacher={self.describes['teacher']['name']}, digest={self.digest})"

    # --- what is there ------------------------------------------------------------------------------
    def epochs(self, rank: int = 0) -> int:
        """How many epochs, from epoch 0 on, hold a complete shard of ``rank``."""
        e = 0
        while os.path.isfile(os.path.join(self.folder, shard_name(e, rank))):
            e += 1
        return e

    def shard(self, epoch: int, rank: int = 0) -> Shard:
        """The shard of ``epoch`` and ``rank``, checked against the manifest."""
        key = (epoch, rank)
        if key not in self._shards:
            path = os.path.join(self.folder, shard_name(epoch, rank))
            if not os.path.isfile(path):
                raise ValueError(f"teacher.cache {self.folder} holds no epoch {epoch} of rank {rank} ({shard_name(epoch, rank)}): "
                                 f"the cache covers {self.epochs(rank)} epochs; extend it with cache-teacher --epochs")
            header = read_header(path)
            expected = HEADER_BYTES + int(header.get("steps", -1)) * self.record_bytes
            if header.get("digest") != self.digest or header.get("record_bytes") != self.record_bytes or \
                    os.path.getsize(path) != expected:
                raise ValueError(f"{path} does not belong to the cache's manifest (another cache's file, or damaged): "
                                 "delete it and run cache-teacher again to rewrite that epoch")
            self._shards = {k: v for k, v in self._shards.items() if k[0] >= epoch - 1}  # unmap old epochs
            self._shards[key] = Shard(path, header, self.fields, self.batch)
        return self._shards[key]

    def statistics(self, epochs: int, rank: int = 0) -> dict:
        """The top-k statistics of the first ``epochs`` shards (mean remaining mass, mean and largest T²·KL)."""
        stats = [self.shard(e, rank).header.get("topk_error") for e in range(epochs)]
        stats = [s for s in stats if s]
        if not stats:
            return {}
        return {"mass_mean": sum(s["mass_mean"] for s in stats) / len(stats),
                "kl_mean": sum(s["kl_mean"] for s in stats) / len(stats), "kl_max": max(s["kl_max"] for s in stats)}

    # --- a run against the cache --------------------------------------------------------------------
    def problems(self, describes: Mapping[str, Any], needs: Mapping[str, list[str]], epochs: int,
                 rank: int = 0, temperatures: Mapping[str, float] | None = None) -> list[str]:
        """Why a run described by ``describes`` (:func:`fastkd.train.cache_check.describe_run`), whose losses
        take ``needs`` of the teacher, training ``epochs`` epochs, cannot use this cache ([] when it can).
        ``temperatures``: {loss: its temperature} for the logit losses (checked against a top-k cache)."""
        found = []
        mine, theirs = dict(self.describes), dict(describes)
        a, b = mine.pop("teacher"), theirs.pop("teacher")
        if a["name"] != b["name"]:
            found.append(f"the teacher is a {a['name']} in the cache, a {b['name']} in this run (teacher.name)")
        if b.get("weights") is not None and a.get("weights") != b["weights"]:
            found.append(f"teacher.checkpoint holds other weights ({b['weights']}) than the cache's teacher "
                         f"({a.get('weights')}, from {self.manifest.get('teacher_checkpoint')})")
        found += [f"{key} is {x!r} in the cache, {y!r} in this run" for key, x, y in _differences(mine, theirs)]
        for key, names in needs.items():
            missing = [s for s in slots(names, self.num_features) if s not in self.slots]
            if missing:
                found.append(f"the {key} loss reads {', '.join(names)} of the teacher, and the cache does not hold "
                             f"{', '.join(map(slot_field, missing))} (it holds {', '.join(map(slot_field, self.slots))})")
        if self.topk is not None:
            for key, t in (temperatures or {}).items():
                if not math.isclose(t, self.topk["temperature"]):
                    found.append(f"the {key} loss reads the logits at temperature {t:g}, and the cache keeps the top-"
                                 f"{self.topk['k']} logits' remaining mass at temperature {self.topk['temperature']:g}")
        held = self.epochs(rank)
        if epochs > held:
            found.append(f"this run trains {epochs} epochs (epochs 0..{epochs - 1}) and the cache holds {held} "
                         f"for rank {rank}")
        return found

    def check(self, describes, needs, epochs, rank=0, temperatures=None) -> None:
        """:meth:`problems` as one ``ValueError`` (nothing is done when there are none)."""
        found = self.problems(describes, needs, epochs, rank, temperatures)
        if found:
            raise ValueError(f"teacher.cache {self.folder} does not match this run: " + "; ".join(found) +
                             ". Make a cache for this run: fastkd cache-teacher RECIPE [overrides] --epochs E "
                             "--output DIR")

    # --- reading ----------------------------------------------------------------------------------
    def outputs(self, fields: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """A step's teacher outputs as the Distiller reads them (``{"logits": [B, C], "feature.i": ...}``), at
        the compute dtype, in the run's memory format, copied to ``device`` (fresh, aligned memory: the run
        never reads the mapped file itself)."""
        out = {}
        if self.topk is not None:
            logits = decode_topk(fields["logits.values"].to(device), fields["logits.indices"].to(device),
                                 fields["logits.fill"].to(device), self.classes)
            out["logits"] = logits.to(self.logits_dtype)
        elif "logits" in fields:
            out["logits"] = fields["logits"].to(device, copy=True)
        for slot in self.slots:
            if slot == "logits":
                continue
            value = fields[f"feature.{slot}"]
            # one copy, in the memory format the live teacher's output had
            layout = torch.channels_last if slot in self.channels_last else torch.preserve_format
            out[f"feature.{slot}"] = value.to(device, dtype=self.feature_dtypes[slot], copy=True, memory_format=layout)
        return out

    def read(self, epoch: int, step: int, rank: int = 0, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The teacher outputs of ``rank``'s batch ``step`` of ``epoch``."""
        return self.outputs(self.shard(epoch, rank).raw(step), device)

    def probe(self, rows: int, rank: int = 0, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The outputs of the first ``rows`` samples of epoch 0's first batch: what a run builds its losses
        from (their shapes; the run's probe sample is that batch's first images)."""
        return {k: v[:rows] for k, v in self.read(0, 0, rank, device).items()}

    def verify(self, epoch: int, step: int, images: torch.Tensor, index: torch.Tensor | None, rank: int = 0) -> None:
        """Refuse a batch that is not the one the cache's record was made from (other indices, other crops)."""
        raw = self.shard(epoch, rank).raw(step)
        where = f"epoch {epoch}, step {step}"
        if index is not None and not torch.equal(raw["index"], index.detach().to("cpu", torch.int64)):
            raise ValueError(f"teacher.cache {self.folder}: the batch of {where} holds other samples than the cache's "
                             "(another data order): the cache was made for other batches; make one for this run")
        got = checksums(images).cpu()
        if not torch.allclose(raw["checksum"], got, rtol=1e-9, atol=1e-6):
            raise ValueError(f"teacher.cache {self.folder}: the images of {where} differ from those the cache's teacher "
                             "saw (other crops, flips or normalisation): make a cache for this run")

    def batches(self, loader, rank: int = 0, device: torch.device | str = "cpu") -> "CachedBatches":
        """``loader``'s batches, each with the teacher's outputs appended (see :class:`CachedBatches`)."""
        return CachedBatches(loader, self, rank, device)


class CachedBatches:
    """A train loader whose batches carry the teacher's outputs: ``(*batch, {"logits": ..., "feature.i": ...})``.

    ``set_epoch(e)`` (the trainer calls it) selects the epoch's shard; each pass reads step j's record
    for the loader's j-th batch. The first batch of every epoch is checked against the record's dataset
    indices and image checksums (:meth:`TeacherCache.verify`: a host sync on a GPU, once per epoch).
    """

    def __init__(self, loader, cache: TeacherCache, rank: int = 0, device: torch.device | str = "cpu"):
        self.loader, self.cache, self.rank, self.device = loader, cache, rank, torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        if hasattr(self.loader, "close"):
            self.loader.close()

    def __getattr__(self, name: str):  # the wrapped loader's dataset, batch size, ...
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        shard = self.cache.shard(epoch, self.rank)
        for step, batch in enumerate(self.loader):
            if step == 0:
                self.cache.verify(epoch, step, batch[0], batch[2] if len(batch) > 2 else None, self.rank)
            yield (*batch, self.cache.outputs(shard.raw(step), self.device))
