"""``fastkd cache-teacher``: run a recipe's teacher once over the exact batches of its first epochs and
store what the recipe's losses read from it (:mod:`fastkd.train.teacher_cache` has the format).

:func:`cache_teacher` builds the recipe's training loader exactly as a run of the recipe does (same seed,
order, crops, flips, normalisation, batch size and rank slices), runs the teacher on each batch as the
Distiller does (eval mode, no gradient, the recipe's autocast, its memory format) and writes, per epoch
and rank, one file of records, with :func:`fastkd.train.cache_check.describe_run` (what a cache and a run
must agree on) in its manifest; a run's side, :func:`fastkd.train.cache_check.open_cache`, refuses a cache
that disagrees, before anything trains.

Under torchrun every rank writes the shards of its own slices of the global batches; rank 0 writes the
manifest. An interrupted command, run again, skips the epochs whose files are complete; a larger
``--epochs`` extends a cache.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import torch

from fastkd.data._files import atomic_write
from fastkd.losses import entry
from fastkd.train import distributed
from fastkd.train.cache_check import describe_run, logit_temperatures, teacher_file
from fastkd.train.rundir import weights_digest
from fastkd.train.distiller import feature_function
from fastkd.train.engine import accuracy, amp_dtype
from fastkd.train.recipe import Recipe
from fastkd.train.teacher_cache import (CACHEABLE, FORMAT, HALF, HEADER_BYTES, MANIFEST, TeacherCache, checksums,
                                        decode_topk, digest_of, dtype_name, encode_topk, layout, serves, shard_name,
                                        slot_field, slots, teacher_needs, topk_error, topk_fields, write_header)

def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


def storage_lines(fields: list[dict], batch: int, steps: int, epochs: int, world: int) -> list[str]:
    """What the cache will take on disk: per sample and field, per epoch and rank, in all."""
    placed, record = layout(fields, batch)
    per_sample = ", ".join(f"{f['name']} {_bytes(f['bytes'] / batch)}" for f in placed)
    epoch = HEADER_BYTES + steps * record
    return [f"per sample: {_bytes(record / batch)} ({per_sample})",
            f"per epoch and rank: {steps} steps x {batch} samples = {_bytes(epoch)}; {epochs} epochs x {world} "
            f"rank(s): {_bytes(epoch * epochs * world)}"]


def _write_epoch(path: str, batches, teacher, autocast, fields, header: dict, topk, feature_dtype) -> dict:
    """Run the teacher over one epoch's batches and write the shard ``path`` atomically; its header."""
    placed, record = layout(fields, header["batch"])
    mass = kl = 0.0
    kl_max, rows, steps = 0.0, 0, 0
    with atomic_write(path) as stream:
        stream.write(b"\0" * HEADER_BYTES)
        for batch in batches:
            images, index = batch[0], batch[2]
            if images.shape[0] != header["batch"]:
                raise ValueError(f"a batch of {images.shape[0]} samples where the cache holds {header['batch']} per step")
            with torch.no_grad(), autocast():
                feats, logits = teacher(images)
            values = {"index": index, "checksum": checksums(images)}
            if topk is not None:
                v, i, fill = encode_topk(logits, topk["k"], topk["temperature"])
                values.update({"logits.values": v, "logits.indices": i, "logits.fill": fill})
                m, d = topk_error(logits, decode_topk(v, i, fill, logits.shape[1]), topk["temperature"])
                mass, kl, kl_max = mass + float(m.sum()), kl + float(d.sum()), max(kl_max, float(d.max()))
                rows += m.numel()
            else:
                values["logits"] = logits
            for f in placed:
                name = f["name"]
                value = values[name] if not name.startswith("feature.") else feats[int(name.split(".")[1])]
                value = value.detach()
                if name.startswith("feature.") and feature_dtype is not None:
                    value = value.to(feature_dtype)
                elif name in ("index", "logits.indices"):
                    value = value.to(torch.int64 if name == "index" else getattr(torch, f["dtype"]))
                data = value.to("cpu").contiguous()
                if dtype_name(data.dtype) != f["dtype"] or tuple(data.shape[1:]) != tuple(f["shape"]):
                    raise RuntimeError(f"{name} came out {data.dtype} {tuple(data.shape)}, the layout says "
                                       f"{f['dtype']} {f['shape']}")
                raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
                stream.write(raw + b"\0" * (-len(raw) % 64))
            steps += 1
        header = {**header, "steps": steps, "record_bytes": record, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if topk is not None:
            header["topk_error"] = {"mass_mean": mass / max(rows, 1), "kl_mean": kl / max(rows, 1), "kl_max": kl_max}
        stream.seek(0)
        write_header(stream, header)
    return header


def _evaluate(teacher, test, autocast) -> dict:
    """The teacher's top-1 / top-5 (%) on the test set (summed over the ranks)."""
    hits1 = hits5 = seen = 0
    for images, target, *_ in test:
        with torch.no_grad(), autocast():
            _, logits = teacher(images)
        h1, h5 = accuracy(logits.float(), target)
        hits1, hits5, seen = hits1 + h1, hits5 + h5, seen + images.shape[0]
    sums = distributed.reduce_sums({"top1": hits1, "top5": hits5, "seen": seen})
    total = max(float(sums["seen"]), 1.0)
    return {"top1": 100.0 * float(sums["top1"]) / total, "top5": 100.0 * float(sums["top5"]) / total}


def cache_teacher(recipe: Recipe, output: str, epochs: int, *, topk: int | None = None, feature_dtype: str | None = None,
                  features: Sequence[str] = (), recipe_name: str | None = None, device: str | None = None,
                  log=print) -> TeacherCache:
    """Write (or resume, or extend) the teacher cache of ``recipe``'s epochs ``0..epochs-1`` in ``output``.

    ``topk``: keep the ``topk`` largest logits and the remaining mass at the temperature of the recipe's
    logit losses (see :mod:`fastkd.train.teacher_cache`), else every logit. ``feature_dtype``: ``"float16"``
    or ``"bfloat16"`` to store the features in half precision, else at the compute dtype. ``features``:
    teacher views to store beyond what the recipe's losses read (``pooled_t``, ``last_block_t``, ...), so
    that the cache also serves other methods. Returns the cache, opened.
    """
    from fastkd.train.run import build_teacher, loaders, training_device

    log = log or (lambda line: None)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"--epochs must be an integer >= 1, got {epochs!r}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"--topk must be an integer >= 1, got {topk!r}")
    if feature_dtype not in (None, *HALF):
        raise ValueError(f"--feature-dtype must be one of {', '.join(HALF)} (or left out: the compute dtype), "
                         f"got {feature_dtype!r}")
    if recipe.teachers:
        raise ValueError(f"teachers lists an ensemble of {len(recipe.teachers)}: cache-teacher caches one teacher "
                         "(an ensemble run computes its teachers live)")
    if teacher_file(recipe) is None:
        raise ValueError("cache-teacher runs the recipe's teacher: set teacher.name and teacher.checkpoint (or "
                         "teacher.weights)")
    if recipe.teacher.cache:
        raise ValueError(f"teacher.cache={recipe.teacher.cache} is set: cache-teacher computes the teacher itself; "
                         "leave teacher.cache out (--output names the cache folder)")
    bad = [name for name in features if not (name.endswith("_t") and name[:-2] in CACHEABLE)]
    if bad:
        raise ValueError(f"--features {', '.join(bad)}: a cache holds {', '.join(v + '_t' for v in CACHEABLE)}")
    needs = teacher_needs(recipe.losses)
    names = list(dict.fromkeys([*(n for names in needs.values() for n in names), *features]))
    if not names:
        raise ValueError(f"no loss of the recipe reads the teacher (losses: {', '.join(recipe.losses)}): there is "
                         "nothing to cache (add --features logits_t,... to cache the teacher anyway)")
    temperatures = logit_temperatures(recipe.losses)
    if topk is not None:
        if len(set(temperatures.values())) > 1:
            raise ValueError(f"--topk keeps the remaining mass at one temperature, and the recipe's logit losses use "
                             f"several ({temperatures}): cache the full logits (leave --topk out)")
        topk = {"k": topk, "temperature": next(iter(temperatures.values()), 1.0)}

    device = distributed.setup(None if device is None else training_device(device)) or training_device(None)
    torch.manual_seed(recipe.seed)
    train, test, class_names, _ = loaders(recipe, device, None)  # contrast draws do not move the crops
    teacher = build_teacher(recipe, len(class_names), device, train)  # a cross-modal teacher reads its view
    preact = any(entry(key).preact for key in recipe.losses if key != "ce")
    run_teacher = feature_function(teacher, None, preact)
    amp = amp_dtype(recipe, device)

    def autocast():
        return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    describes = describe_run(recipe, train, weights_digest(teacher_file(recipe)), device)
    info = {"recipe": recipe_name, "resolved": recipe.to_dict(), "teacher_checkpoint": teacher_file(recipe),
            "device": str(device)}
    return write(output, train, run_teacher, autocast, names, describes, epochs, topk=topk,
                 feature_dtype=feature_dtype, test=test, info=info, log=log)


def write(output: str, train, run_teacher, autocast, names: Sequence[str], describes: dict, epochs: int, *,
          topk: dict | None = None, feature_dtype: str | None = None, test=None, info: dict | None = None,
          log=print) -> TeacherCache:
    """The cache of any train loader and teacher: ``run_teacher(images) → (features, logits)`` (RepDistiller's
    feature list; :func:`fastkd.train.distiller.feature_function`) on each batch ``(images, labels, index, ...)``
    of ``train`` for epochs ``0..epochs-1`` (``train.set_epoch(e)`` selects one), under ``autocast()``, storing
    the teacher features ``names`` (``logits_t``, ``pooled_t``, ...). ``describes``: what a run must agree on
    (:func:`describe_run`; it needs ``teacher``, ``batch_size``, ``world_size``, ``compute_dtype`` and
    ``channels_last``); ``topk``: ``{"k", "temperature"}``; ``test``: a test loader to measure the teacher's
    accuracy on; ``info``: more manifest entries. :func:`cache_teacher` calls this for a recipe."""
    log = log or (lambda line: None)
    rank, world = distributed.rank(), distributed.world_size()
    train.set_epoch(0)
    first = next(iter(train))
    batch = first[0].shape[0]
    with torch.no_grad(), autocast():
        feats, logits = run_teacher(first[0])
    stored = slots(names, len(feats))
    classes = logits.shape[1]
    if topk is not None and "logits" not in stored:
        raise ValueError("--topk keeps logits, and no loss of the recipe reads the teacher's logits (add --features "
                         "logits_t to store them anyway, or leave --topk out)")
    if topk is not None and topk["k"] >= classes:
        raise ValueError(f"--topk {topk['k']}: the teacher has {classes} classes; top-k stores fewer (leave --topk out "
                         "to store every logit)")
    fields = [{"name": "index", "dtype": "int64", "shape": []}, {"name": "checksum", "dtype": "float64", "shape": [2]}]
    if "logits" in stored:
        fields += topk_fields(topk["k"], classes, dtype_name(logits.dtype)) if topk is not None else \
            [{"name": "logits", "dtype": dtype_name(logits.dtype), "shape": [classes]}]
    half = getattr(torch, feature_dtype) if feature_dtype else None
    feature_dtypes, feature_formats = {}, {}
    for slot in stored:
        if slot != "logits":
            feature_dtypes[str(slot)] = dtype_name(feats[slot].dtype)
            f = feats[slot]
            feature_formats[str(slot)] = ("channels_last" if f.dim() == 4 and not f.is_contiguous() and
                                          f.is_contiguous(memory_format=torch.channels_last) else "contiguous")
            fields.append({"name": slot_field(slot), "dtype": dtype_name(half or feats[slot].dtype),
                           "shape": list(feats[slot].shape[1:])})
    stores = {"slots": stored, "fields": fields, "num_features": len(feats), "classes": classes, "topk": topk,
              "logits_dtype": dtype_name(logits.dtype), "feature_dtypes": feature_dtypes,
              "feature_formats": feature_formats,
              "feature_storage": feature_dtype or "exact"}
    digest = digest_of({"describes": describes, "stores": stores})
    path = os.path.join(output, MANIFEST)
    previous = _previous(path, digest, output)
    if rank == 0:
        os.makedirs(output, exist_ok=True)
    steps = len(train)
    for line in storage_lines(fields, batch, steps, epochs, world):
        log(f"cache-teacher: {line}")
    teacher_eval = (previous or {}).get("teacher_eval")
    if teacher_eval is None and test is not None:
        teacher_eval = _evaluate(run_teacher, test, autocast)
        log(f"teacher {describes['teacher']['name']}: top-1 {teacher_eval['top1']:.2f} top-5 {teacher_eval['top5']:.2f} on "
            "the test set")
    manifest = {"format": FORMAT, "digest": digest, "describes": describes, "stores": stores,
                "epochs": max(epochs, (previous or {}).get("epochs", 0)), "steps_per_epoch": steps,
                "serves": serves(stored, len(feats)), "teacher_eval": teacher_eval, **(info or {}),
                "torch": torch.__version__,
                "created": (previous or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S")}
    if rank == 0:
        with atomic_write(path) as stream:
            stream.write(json.dumps(manifest, indent=1, sort_keys=False).encode())
    distributed.barrier()
    cache = TeacherCache(output)
    header = {"digest": digest, "rank": rank, "world_size": world, "batch": batch}
    for epoch in range(epochs):
        shard = os.path.join(output, shard_name(epoch, rank))
        if os.path.isfile(shard):
            cache.shard(epoch, rank)  # checks that it belongs to this manifest
            log(f"epoch {epoch + 1}/{epochs}: {shard_name(epoch, rank)} is complete already")
            continue
        start = time.perf_counter()
        train.set_epoch(epoch)
        written = _write_epoch(shard, train, run_teacher, autocast, fields, {**header, "epoch": epoch}, topk, half)
        error = written.get("topk_error")
        said = (f"; top-{topk['k']} at T={topk['temperature']:g}: remaining mass {error['mass_mean']:.4g} on average, "
                f"KD target error T²·KL {error['kl_mean']:.3g} on average (max {error['kl_max']:.3g})") if error else ""
        log(f"epoch {epoch + 1}/{epochs}: {written['steps']} steps in {time.perf_counter() - start:.1f}s -> "
            f"{shard_name(epoch, rank)}{said}")
    distributed.barrier()
    return cache


def _previous(path: str, digest: str, output: str) -> dict | None:
    """The manifest already in ``output`` (a cache being resumed or extended), or ``None``; ``ValueError``
    when it is the cache of another run or the folder holds other files."""
    if not os.path.isfile(path):
        if os.path.isdir(output) and any(not name.startswith(".") for name in os.listdir(output)):
            raise ValueError(f"--output {output} holds files and no teacher cache: give an empty or new folder")
        return None
    try:
        with open(path) as stream:
            previous = json.load(stream)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}): remove the folder or give another --output") from None
    if previous.get("digest") != digest:
        old, new = previous.get("describes", {}), None
        raise ValueError(f"--output {output} holds the teacher cache of another run or storage (manifest digest "
                         f"{previous.get('digest')}, this one {digest}; teacher {old.get('teacher', {}).get('name')}, "
                         f"seed {old.get('seed')}): give another --output{new or ''}")
    return previous


