"""The precision policy of the losses: accumulate in fp32 whatever the input dtype."""
import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 → fp32, so products and sums accumulate in fp32; fp32 / fp64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
