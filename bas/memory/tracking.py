"""Counting the bytes a step holds: live storages, the device's attention kernel, CUDA's autocast.

:class:`LiveStorages` is a dispatch mode that sees every operation's outputs and keeps, by weak
reference, each new storage until it is freed: its running total is what an allocator would hold
(without its rounding and cache), its maximum the step's peak.  :class:`TargetDevice` makes a step
computed on fake CPU tensors choose what the planned device would: the fused attention kernel CUDA
picks (flash attention or memory-efficient attention, whose backward keeps no attention matrix) and
the operations CUDA's autocast runs in fp32.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorages(TorchDispatchMode):
    """The bytes of live storages that operations create (or that :meth:`include` adds), and their peak.

    ``exclude`` takes storages off the count (a module moved off the device) until they are freed.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _add(self, tensor: torch.Tensor, real: bool = False) -> None:
        if not real and type(tensor).__name__ != "FakeTensor":
            return  # real tensors made by operations here are the tokenizers' ids and small constants
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def include(self, tensors) -> None:
        """Count the storages of ``tensors`` (fake or real) from now until they are freed."""
        for t in tensors:
            self._add(t, real=True)

    def exclude(self, tensors) -> None:
        for t in tensors:
            self._free(t.untyped_storage()._cdata)

    def bytes_of(self, tensors) -> int:
        """The bytes of the distinct storages of ``tensors``."""
        seen = {}
        for t in tensors:
            s = t.untyped_storage()
            seen[s._cdata] = s.nbytes()
        return sum(seen.values())

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an input's storage: not a new allocation
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._add(t)
        return out


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


# Functions CUDA's autocast runs in fp32 that CPU's runs in the lower precision (among PyTorch's "CUDA
# ops that can autocast to float32", those diffusion models and their text encoders call).
CUDA_FP32_FUNCTIONS = (
    (torch.nn.functional, "group_norm"),
    (torch.nn.functional, "layer_norm"),
    (torch.nn.functional, "softmax"),
    (torch.nn.functional, "log_softmax"),
    (torch.Tensor, "softmax"),
)


def cuda_attention_kernel(query: torch.Tensor, attn_mask, dropout_p: float) -> str:
    """The fused kernel PyTorch's CUDA SDPA picks on an Ampere or newer GPU (``sdp_utils.cpp``):
    flash attention for fp16/bf16 without a mask and head size at most 256, else memory-efficient
    attention (any float dtype, masks), else the math path."""
    head = query.shape[-1]
    if query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and head <= 256 and head % 8 == 0:
        return "flash"
    if query.dtype in (torch.float16, torch.bfloat16, torch.float32) and head % (8 if query.dtype != torch.float32 else 4) == 0:
        return "efficient"
    return "math"


class TargetDevice:
    """Computing on fake CPU tensors what a step on a CUDA GPU keeps: its SDPA kernel (whose outputs
    and saved tensors the kernel's own shape functions give) and its autocast's fp32 functions.

    The functions are replaced where models look them up (``torch.nn.functional``, ``torch.Tensor``)
    for as long as the context lasts, so gradient checkpointing's recomputation, which runs inside
    the backward pass, computes exactly what the forward pass did."""

    def __init__(self, device_type: str):
        self.cuda = device_type == "cuda"
        self.kernels: dict[str, int] = {}
        self._saved: list = []

    def __enter__(self):
        if not self.cuda:
            return self
        sdpa = torch.nn.functional.scaled_dot_product_attention
        self._replace(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: self.attention(sdpa, *a, **k))
        for owner, name in CUDA_FP32_FUNCTIONS:
            self._replace(owner, name, _in_fp32_under_autocast(getattr(owner, name)))
        return self

    def __exit__(self, *exc):
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)

    def _replace(self, owner, name, function):
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, function)

    def attention(self, sdpa, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        kernel = cuda_attention_kernel(query, attn_mask, dropout_p)
        self.kernels[kernel] = self.kernels.get(kernel, 0) + 1
        if key.shape[1] != query.shape[1] and enable_gqa:  # grouped-query attention: the kernels take repeated heads
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        if kernel == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        if kernel == "efficient":
            bias = attn_mask
            if bias is not None and bias.dtype == torch.bool:
                bias = torch.zeros_like(bias, dtype=query.dtype).masked_fill(~bias, float("-inf"))
            if bias is not None:
                bias = bias.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout_p, is_causal, scale=scale)[0]
        return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)


def _in_fp32_under_autocast(function):
    def fp32(*args, **kwargs):
        if not torch.is_autocast_enabled("cpu"):
            return function(*args, **kwargs)
        args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with torch.autocast("cpu", enabled=False):
            return function(*args, **kwargs)

    return fp32


@contextlib.contextmanager
def fake_module_conversion():
    """``module.to(...)`` on fake tensors: ``nn.Module._apply`` swaps a fake parameter with its converted
    copy, which fails when the fake tensor mode holds a weak reference to it (its memo); the parameter
    then takes the copy's data instead, as ``_apply`` does for ordinary tensors."""
    import torch.utils

    original = torch.utils.swap_tensors

    def swap(t1, t2):
        try:
            original(t1, t2)
        except RuntimeError:
            t1.data = t2.data

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original
