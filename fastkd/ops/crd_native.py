"""The native backend of CRD on CUDA tensors: the ops ``fastkd::crd_nce_cuda`` and ``fastkd::crd_bank_update_cuda_``.

Their kernels are CUDA C++ (csrc/cuda/crd.cu, bound in csrc/cuda/crd_binding.cpp), registered from C++ for the
CUDA dispatch key when ``fastkd._C`` was built with a CUDA toolkit; their schemas, fakes and autograd are those
of :mod:`fastkd.ops.crd`'s ops, defined here. They compute in fp32 from fp32 / fp16 / bf16 tensors and refuse
float64 ones (:func:`fastkd.ops.crd.nce` runs float64 anchors on the public op). Without CUDA kernels the backend
table does not offer them. (On CPU tensors the native backend runs the public ops
themselves: their C++ CPU kernels are registered over the reference.)
"""
from fastkd.ops import crd
from fastkd.ops._library import variant

CRD_NCE = variant(crd.CRD_NCE, "native", "cuda", name="crd_nce_cuda")
CRD_BANK_UPDATE = variant(crd.CRD_BANK_UPDATE, "native", "cuda", name="crd_bank_update_cuda_")
