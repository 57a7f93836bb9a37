"""Capturing cross-attention probabilities in chosen layers while every other layer keeps its fused kernel.

:class:`AttentionStore` collects, per denoiser forward pass, the head-averaged probabilities of
the layers a family's capture processor is installed on.  :class:`CaptureCrossAttention` is that
processor for diffusers' ``Attention`` modules (the UNet families' ``attn2``).
"""

from __future__ import annotations

import torch


class AttentionStore:
    """Maps recorded per denoiser forward: ``forwards`` holds (encoder_hidden_states, [maps per layer]).

    The loss records only forwards that build a graph (training steps); ``without_grad`` also
    records inference forwards (the report's attention maps).
    """

    def __init__(self, without_grad: bool = False):
        self.forwards: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self.without_grad = without_grad

    def recording(self) -> bool:
        return bool(self.forwards) and (self.without_grad or torch.is_grad_enabled())

    def begin_forward(self, module, args, kwargs):
        """A forward pre-hook on the denoiser: a new forward pass starts (keyed by its text tokens)."""
        if not torch.is_grad_enabled():  # sampling (class images, previews) records nothing
            return
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.forwards.append((ehs, []))

    def maps_for(self, encoder_hidden_states: torch.Tensor) -> list[torch.Tensor]:
        for ehs, maps in self.forwards:
            if ehs is encoder_hidden_states:
                return maps
        return []

    def clear(self) -> None:
        self.forwards.clear()


def attention_probabilities(attn, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention probabilities ``(B, heads, Q, T)`` in fp32 of ``query``/``key`` ``(B, heads, L, d)``.

    As diffusers' ``Attention.get_attention_scores`` computes them with ``upcast_attention`` and
    ``upcast_softmax`` on (the scale as ``baddbmm``'s ``alpha``, a mask as its added input), whatever
    the module's flags say and outside autocast: under bf16 autocast the product ``q k^T`` would
    otherwise be rounded to bf16 before the softmax, which moves per-head maps by several percent.
    """
    batch, heads, q_len, head_dim = query.shape
    with torch.autocast(query.device.type, enabled=False):
        q = query.float().reshape(batch * heads, q_len, head_dim)
        k = key.float().reshape(batch * heads, key.shape[2], head_dim)
        if attention_mask is None:
            bias, beta = torch.empty(q.shape[0], q_len, k.shape[1], dtype=q.dtype, device=q.device), 0
        else:
            bias, beta = attn.prepare_attention_mask(attention_mask, k.shape[1], batch).float(), 1
        scores = torch.baddbmm(bias, q, k.transpose(-1, -2), beta=beta, alpha=attn.scale)
        return scores.softmax(dim=-1).view(batch, heads, q_len, k.shape[1])


class CaptureCrossAttention:
    """An attention processor that also records head-averaged softmax probabilities ``(B, Q, T)`` in fp32.

    The output is what diffusers' ``AttnProcessor`` computes from the same fp32 probabilities.
    """

    def __init__(self, store: AttentionStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        probs = attention_probabilities(attn, query, key, attention_mask)
        if self.store.recording():  # empty during checkpoint recomputation
            self.store.forwards[-1][1].append(probs.mean(dim=1))
        hidden_states = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
