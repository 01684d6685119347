"""A network that reads its own view of a multi-view batch: the hook for "the teacher's input differs
from the student's".

In a cross-modal run (:mod:`fastkd.data.views`) every batch holds all the views stacked along the channels,
``[B, C_student + C_teacher, H, W]``, made from one crop and flip. :func:`read_view` makes a network read
its channels of it and nothing else: its first convolution is rebuilt for the view's channel count (1 for
L, 2 for ab), and a forward pre-hook hands ``model`` only ``x[:, channels]``. Everything that calls the
model — the distillation objective, the trainer's evaluation, feature taps, the linear probe — then feeds
each network its own view without knowing about views. The state_dict keys stay the model's own (only the
first convolution's weight changes shape: ``[out, C_view, k, k]``).
"""
from __future__ import annotations

from torch import nn


def first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent, attribute name, conv) of the first ``nn.Conv2d`` in ``model.named_modules()`` order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attribute, module
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d: read_view adapts a convolutional network's stem")


def with_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """``model`` with its first convolution rebuilt (freshly initialised) for ``in_channels`` inputs; unchanged
    when it already takes that many."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    parent, attribute, conv = first_conv(model)
    if conv.in_channels == in_channels:
        return model
    if conv.groups != 1:
        raise ValueError(f"the first convolution of {type(model).__name__} is grouped ({conv.groups} groups): "
                         "it cannot be rebuilt for another channel count")
    rebuilt = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                        bias=conv.bias is not None, padding_mode=conv.padding_mode)
    setattr(parent, attribute, rebuilt.to(conv.weight.device, conv.weight.dtype))
    return model


def read_view(model: nn.Module, channels: slice, total: int) -> nn.Module:
    """Make ``model`` read ``x[:, channels]`` of batches with ``total`` channels (see the module doc).

    Its first convolution takes ``channels.stop - channels.start`` inputs afterwards; when the view is the
    whole batch no hook is added. Returns ``model`` (changed in place).
    """
    if not isinstance(channels, slice) or channels.start is None or channels.stop is None or channels.step not in (None, 1):
        raise ValueError(f"channels must be a slice(start, stop) of the batch's channels, got {channels!r}")
    if not 0 <= channels.start < channels.stop <= total:
        raise ValueError(f"channels {channels.start}:{channels.stop} do not lie in the batch's {total} channels")
    with_in_channels(model, channels.stop - channels.start)
    previous = getattr(model, "_fastkd_view_hook", None)
    if previous is not None:
        previous.remove()
    if (channels.start, channels.stop) != (0, total):
        def take(module, args, kwargs):
            x, *rest = args
            if x.shape[1] != total:
                raise ValueError(f"{type(module).__name__} reads channels {channels.start}:{channels.stop} of "
                                 f"{total}-channel view batches, got a {x.shape[1]}-channel batch")
            return (x[:, channels], *rest), kwargs

        model._fastkd_view_hook = model.register_forward_pre_hook(take, with_kwargs=True)
    model.fastkd_view = (channels.start, channels.stop, total)
    return model
