"""Triton kernels only: pure functions of pointers and constexprs (filled by the fused-op issues)."""
