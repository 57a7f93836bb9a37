"""The cross-attention loss: each shown handle's attention map at 16x16 should match its concept's mask.

Only the cross-attention layers at the loss resolution capture anything, and only there are the
probabilities computed explicitly (a few hundred queries by 77 keys).  Every other layer keeps its
fused attention kernel: the reference code computes explicit probabilities everywhere, including
the 4096x4096 self-attention maps, which is where its memory goes.
"""

from __future__ import annotations

import click
import torch
from torch.nn import functional as F

from bas import hookimpl
from bas.core.components import LossTerm, StepBatch
from bas.core.errors import BasError


class AttentionStore:
    """Maps recorded per UNet forward: ``forwards`` holds (encoder_hidden_states, [maps per layer]).

    The loss records only forwards that build a graph (training steps); ``without_grad`` also
    records inference forwards (the report's attention maps).
    """

    def __init__(self, without_grad: bool = False):
        self.forwards: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self.without_grad = without_grad

    def recording(self) -> bool:
        return bool(self.forwards) and (self.without_grad or torch.is_grad_enabled())

    def begin_forward(self, module, args, kwargs):
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


class CaptureCrossAttention:
    """An attention processor that also records head-averaged softmax probabilities ``(B, Q, T)``."""

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
        scores = (query @ key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1])
        probs = scores.float().softmax(dim=-1)
        if self.store.recording():  # empty during checkpoint recomputation
            self.store.forwards[-1][1].append(probs.mean(dim=1))
        hidden_states = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet, latent_size: int) -> dict[str, tuple[torch.nn.Module, int]]:
    """Every cross-attention module of the down and up blocks with the resolution it runs at."""
    n = len(unet.config.block_out_channels)
    layers = {}
    for name, module in unet.named_modules():
        if not name.endswith("attn2"):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = n - 1 - int(parts[1])
        else:  # the mid block is not used by the paper's loss
            continue
        layers[name] = (module, latent_size // 2**level)
    return layers


def loss_resolution(run, requested: int | None = None) -> int:
    """The attention-map resolution: ``requested``, else a quarter of the latent (16x16 at 512 px)."""
    return requested or run.resolution // run.components.vae_scale_factor // 4


@torch.no_grad()
def handle_attention_maps(run, res: int | None = None, timestep: int | None = None, seed: int = 0) -> torch.Tensor:
    """(N, res, res): each handle's cross-attention map on the input image, as the loss sees it.

    The prompt names every handle; the image's latents are noised to ``timestep`` (default 40% of
    the training schedule) with a fixed seed, so maps from different phases compare.  Maps are
    averaged over the layers at ``res`` and their heads and divided by their max.  The training
    random generators are not touched.
    """
    c = run.components
    latent = run.resolution // c.vae_scale_factor
    res = loss_resolution(run, res)
    chosen = [m for m, r in cross_attention_layers(c.unet, latent).values() if r == res]
    if not chosen:
        raise BasError(f"The model has no cross-attention layers at {res}x{res}; set --attention-res to another size.")
    n = run.scene.num_concepts
    input_ids = run.tokenize([run.prompt_for(list(range(n)))])
    ids = input_ids[0].tolist()
    positions = [ids.index(run.token_ids[k]) for k in range(n)]
    sched = c.noise_scheduler
    t = torch.tensor([timestep if timestep is not None else int(0.4 * sched.config.num_train_timesteps)], device=run.device)
    latents = run.latent_mean[:1] * c.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(run.device)
    store = AttentionStore(without_grad=True)
    store.forwards.append((None, []))
    processor = CaptureCrossAttention(store)
    restore = [(m, m.processor) for m in chosen]
    modes = (c.unet.training, c.text_encoder.training)
    try:
        c.unet.eval()
        c.text_encoder.eval()
        for module in chosen:
            module.set_processor(processor)
        with run.autocast():
            run.predict(sched.add_noise(latents, noise, t), t, input_ids)
    finally:
        for module, previous in restore:
            module.set_processor(previous)
        c.unet.train(modes[0])
        c.text_encoder.train(modes[1])
    mean = torch.stack(store.forwards[0][1]).mean(dim=0)[0]  # (Q, T)
    maps = mean[:, positions].T.reshape(n, res, res).float()
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-8)


class CrossAttentionLoss(LossTerm):
    name = "attention"

    def __init__(self, config):
        self.weight = config.options.get("attention_loss_weight", 0.01)
        self.requested_res = config.options.get("attention_res")
        self.store = AttentionStore()
        self._restore: list[tuple[torch.nn.Module, object]] = []
        self._hook = None

    def setup(self, run) -> None:
        latent = run.resolution // run.components.vae_scale_factor
        layers = cross_attention_layers(run.components.unet, latent)
        self.res = loss_resolution(run, self.requested_res)  # 16x16 for 512 px images, as in the paper
        chosen = {n: m for n, (m, r) in layers.items() if r == self.res}
        if not chosen:
            have = sorted({r for _, r in layers.values()})
            raise BasError(f"The model has no cross-attention layers at {self.res}x{self.res}; set --attention-res to one of {have}.")
        self.layer_names = sorted(chosen)
        processor = CaptureCrossAttention(self.store)
        for module in chosen.values():
            self._restore.append((module, module.processor))
            module.set_processor(processor)
        self._hook = run.components.unet.register_forward_pre_hook(self.store.begin_forward, with_kwargs=True)

    def teardown(self, run) -> None:
        for module, processor in self._restore:
            module.set_processor(processor)
        self._restore.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.store.clear()

    def token_maps(self, batch: StepBatch) -> torch.Tensor:
        """(B, K, res, res): each shown handle's map, averaged over layers and heads, divided by its max."""
        maps = self.store.maps_for(batch.encoder_hidden_states)
        if not maps:
            raise RuntimeError("no attention maps were captured for this step's forward pass")
        mean = torch.stack(maps).mean(dim=0)  # (B, Q, T)
        b = mean.shape[0]
        token = mean[:, :, batch.token_positions].permute(0, 2, 1).reshape(b, len(batch.token_positions), self.res, self.res)
        return token / token.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-8)

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        try:
            maps = self.token_maps(batch)
        finally:
            self.store.clear()
        target = F.interpolate(batch.masks.float(), size=(self.res, self.res), mode="area")
        # MSE per shown concept, summed over concepts (the paper's formulation)
        return F.mse_loss(maps.float(), target, reduction="none").mean(dim=(0, 2, 3)).sum()


@hookimpl
def bas_run_options():
    return [
        click.Option(["--attention-loss-weight"], type=float, default=0.01, show_default=True, help="Weight of the cross-attention loss (the paper's lambda)."),
        click.Option(["--attention-res"], type=int, default=None, help="Resolution of the attention maps compared with the masks [default: latent size / 4, 16 at 512 px]."),
    ]


@hookimpl
def bas_register_loss_terms(register):
    register("attention", CrossAttentionLoss, description="MSE between handle cross-attention maps and masks at 16x16")
