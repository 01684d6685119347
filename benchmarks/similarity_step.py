"""One step of a batch-relation loss (SP, CCKD, PKT, RKD distance, RKD angle, NST; IUSP) at a benchmark size, per
provider.

Used by benchmarks/test_similarity.py and benchmarks/test_iusp.py, and as a script to measure one provider's peak extra memory in a
fresh process (``python benchmarks/similarity_step.py LOSS PROVIDER SIZE`` prints bytes): the peak resident
memory of a full step (forward + backward) beyond what the process held before it (Linux: VmHWM reset
through clear_refs), with big buffers mmapped so that freed memory is returned.

Providers: ``torch`` (the published computation: eager torch with autograd, the ``torch`` backend),
``native`` (the C++ kernels), ``triton``. Modes: ``forward`` (the loss, with the graph recorded),
``backward`` (backward of a recorded forward), ``full`` (both).
"""
from __future__ import annotations

import sys

import torch

from _memory import peak_extra_bytes  # benchmarks/ is on sys.path (run as a script, or from the suites)
from _provider import selected

from fastkd import functional as fk
from fastkd.ops import similarity as relations

# loss -> (student shape, teacher shape) per size: CPU sizes at b = 64 (SP / NST on a resnet8x4-like
# last-stage map, 256 × 8 × 8; CCKD / PKT / RKD on 128-d embeddings); GPU sizes at b = 256, C·H·W = 16,384;
# IUSP's: B = 64 sequences of T = 500 frames of C = 128 or 512 (on CPU in benchmarks/test_iusp.py, size "iusp";
# on GPU with the others, so that gpu-check's bench-similarity stage runs them).
SIZES = {
    "cpu": {
        "sp": ((64, 256, 8, 8), (64, 256, 8, 8)),
        "cckd": ((64, 128), (64, 128)),
        "pkt": ((64, 128), (64, 128)),
        "rkd_distance": ((64, 128), (64, 128)),
        "rkd_angle": ((64, 128), (64, 128)),
        "nst": ((64, 256, 8, 8), (64, 256, 8, 8)),
    },
    "gpu": {
        "sp": ((256, 256, 8, 8), (256, 256, 8, 8)),
        "cckd": ((256, 16384), (256, 16384)),
        "pkt": ((256, 16384), (256, 16384)),
        "rkd_distance": ((256, 16384), (256, 16384)),
        "rkd_angle": ((256, 16384), (256, 16384)),
        "nst": ((256, 256, 8, 8), (256, 256, 8, 8)),
        "iusp_c128": ((64, 500, 128), (64, 500, 128)),
        "iusp_c512": ((64, 500, 512), (64, 500, 512)),
    },
    "iusp": {
        "iusp_c128": ((64, 500, 128), (64, 500, 128)),
        "iusp_c512": ((64, 500, 512), (64, 500, 512)),
    },
}


def _rkd_distance(f_s, f_t):
    """RKD's distance term alone (RKDLoss computes it beside the angle term)."""
    return relations.rkd_distance(f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1))


def _rkd_angle(f_s, f_t):
    """RKD's angle term alone."""
    return relations.rkd_angle(f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1))


LOSSES = {"sp": fk.sp_loss, "cckd": fk.cckd_loss, "pkt": fk.pkt_loss, "rkd_distance": _rkd_distance,
          "rkd_angle": _rkd_angle, "nst": fk.nst_loss, "iusp_c128": fk.iusp_loss, "iusp_c512": fk.iusp_loss}


def make_step(loss: str, size: str, mode: str, device: str = "cpu"):
    """(target, setup): ``target(*setup())`` runs one ``mode`` step on the selected provider; ``setup`` is None
    except for backward."""
    shape_s, shape_t = SIZES[size][loss]
    gen = torch.Generator().manual_seed(0)
    f_s = torch.randn(shape_s, generator=gen).to(device).requires_grad_()
    f_t = torch.randn(shape_t, generator=gen).to(device)
    fn = LOSSES[loss]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        f_s.grad = None
        out = fn(f_s, f_t)
        sync()
        return out

    def backward(out):
        out.backward()
        sync()

    def full():
        backward(forward())

    full()  # warm-up (and Triton's compilation)
    if mode == "forward":
        return forward, None
    if mode == "backward":
        return backward, lambda: ((forward(),), {})
    return full, None


if __name__ == "__main__":
    with selected(sys.argv[2]):
        print(peak_extra_bytes(make_step(sys.argv[1], sys.argv[3], "full")[0]))
