// fastkd's native library: kernel registrations for the schemas defined in fastkd/ops (Python).
// Each op family has its kernels in cpu/<family>.cpp (and cuda/<family>.cu when built with CUDA).
#include <Python.h>
#include <torch/library.h>

#include "cpu/ops.h"

// A plain Python module, so that `import fastkd._C` loads this library and runs the
// registrations below; it exposes nothing else.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

#ifdef FASTKD_BUILD_TAG
// What this library was built for and from ("fastkd-build:torch=...;build=..."; fastkd/_native/plan.py):
// the loader reads it from the file's bytes before loading the library. `used` keeps it in the file.
__attribute__((used)) static const char fastkd_build_tag[] = {FASTKD_BUILD_TAG, 0};
#endif

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("crd_bank_update_", &fastkd::cpu::crd_bank_update_);
  m.impl("crd_nce", &fastkd::cpu::crd_nce);
  m.impl("crd_nce_multi", &fastkd::cpu::crd_nce_multi);
  m.impl("kd_loss", &fastkd::cpu::kd_loss);
  m.impl("kd_loss_backward", &fastkd::cpu::kd_loss_backward);
  m.impl("kd_loss_with_grad", &fastkd::cpu::kd_loss_with_grad);
  m.impl("dkd_loss", &fastkd::cpu::dkd_loss);
  m.impl("dkd_loss_backward", &fastkd::cpu::dkd_loss_backward);
  m.impl("sp_loss", &fastkd::cpu::sp_loss);
  m.impl("iusp_loss", &fastkd::cpu::iusp_loss);
  m.impl("cckd_loss", &fastkd::cpu::cckd_loss);
  m.impl("pkt_loss", &fastkd::cpu::pkt_loss);
  m.impl("rkd_distance_loss", &fastkd::cpu::rkd_distance_loss);
  m.impl("rkd_angle_loss", &fastkd::cpu::rkd_angle_loss);
  m.impl("nst_loss", &fastkd::cpu::nst_loss);
}

// Autograd of the ops whose CPU step at b = 64 takes tens of microseconds, in C++: there torch.library's Python
// autograd node measured +25-45 us, 40-70% of the step (cpu/logits_autograd.cpp, cpu/similarity_autograd.cpp).
// Every other op and device uses the one formula registered in Python (fastkd/ops).
TORCH_LIBRARY_IMPL(fastkd, AutogradCPU, m) {
  m.impl("kd_loss", &fastkd::cpu::kd_loss_autograd);
  m.impl("dkd_loss", &fastkd::cpu::dkd_loss_autograd);
  m.impl("cckd_loss", &fastkd::cpu::cckd_loss_autograd);
  m.impl("pkt_loss", &fastkd::cpu::pkt_loss_autograd);
  m.impl("rkd_distance_loss", &fastkd::cpu::rkd_distance_loss_autograd);
  m.impl("rkd_angle_loss", &fastkd::cpu::rkd_angle_loss_autograd);
}
