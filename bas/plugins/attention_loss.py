"""The cross-attention loss: each shown handle's attention map should match its concept's mask.

The maps are read at a quarter of the latent side by default, never coarser than the paper's
16x16 (16x16 for SD at 512 px and for bas-mini, 32x32 for SDXL at 1024 px), snapped to a side
where the model has cross-attention layers and never below 4x4; the model family says which
layers those are and installs the capturing processor.  Only
those layers compute explicit probabilities (a few hundred or thousand queries by 77 keys, in
fp32); every other layer keeps its fused attention kernel: the reference code computes explicit
probabilities everywhere, including the 4096x4096 self-attention maps, which is where its memory
goes.
"""

from __future__ import annotations

import click
import torch
from torch.nn import functional as F

from bas import hookimpl
from bas.core.attention import AttentionStore
from bas.core.components import LossTerm, StepBatch
from bas.core.errors import BasError


def loss_layers(run, requested: int | None = None) -> tuple[int, dict[str, tuple[torch.nn.Module, int]]]:
    """The maps' side and the layers that give them, ``name -> (module, side)``: the layers at that
    side, or (a family whose layers run finer, such as packed transformer tokens) those whose side
    is a multiple of it, averaged down."""
    latent = run.resolution // run.components.vae_scale_factor
    layers = run.family.attention_layers(run.components, latent)
    res = run.family.attention_resolution({r for _, r in layers.values()}, latent, requested)
    chosen = {n: (m, r) for n, (m, r) in layers.items() if r == res}
    if not chosen:
        chosen = {n: (m, r) for n, (m, r) in layers.items() if r > res and r % res == 0}
    if not chosen:
        have = sorted({r for _, r in layers.values()})
        raise BasError(f"The model has no cross-attention layers at {res}x{res}; set --attention-res to one of {have}.")
    return res, chosen


def token_maps(maps: list[torch.Tensor], sides: list[int], positions: list[int], res: int) -> torch.Tensor:
    """(B, K, res, res): the maps of the tokens at ``positions``, averaged over layers (each at its
    ``side``, area-averaged to ``res``) and heads, each divided by its max."""
    return normalised(token_probabilities(maps, sides, positions, res))


def normalised(token: torch.Tensor) -> torch.Tensor:
    """Each map divided by its max (the paper's normalisation before the MSE with the mask)."""
    return token / token.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-8)


def token_probabilities(maps: list[torch.Tensor], sides: list[int], positions: list[int], res: int) -> torch.Tensor:
    """(B, K, res, res): the attention probabilities of the tokens at ``positions``, averaged over
    layers (each at its ``side``, area-averaged to ``res``) and heads, not normalised."""
    if all(side == res for side in sides):
        mean = torch.stack(maps).mean(dim=0)  # (B, Q, T)
        b = mean.shape[0]
        token = mean[:, :, positions].permute(0, 2, 1).reshape(b, len(positions), res, res)
    else:
        per_layer = [F.interpolate(m[:, :, positions].permute(0, 2, 1).reshape(m.shape[0], len(positions), s, s), size=(res, res), mode="area")
                     for m, s in zip(maps, sides)]
        token = torch.stack(per_layer).mean(dim=0)
    return token


@torch.no_grad()
def probe_forward(run, processors: dict, timestep: int | None = None, fraction: float = 0.4, seed: int = 0) -> list[int]:
    """One inference forward on the input image, ``processors`` (``{attention module: processor}``) installed
    and the trainable modules in eval mode for it, everything restored after; returns the handles' token positions.

    The prompt names every handle; the latents are noised to ``timestep`` (default ``fraction`` of the
    training schedule) with a fixed ``seed``, so forwards from different steps compare.  The training
    random generators are not touched."""
    c, family = run.components, run.family
    n = run.scene.num_concepts
    input_ids = run.tokenize([run.prompt_for(list(range(n)))])
    positions = run.token_positions(input_ids, list(range(n)))
    sched = c.noise_scheduler
    t = torch.tensor([timestep], device=run.device) if timestep is not None else family.probe_timestep(sched, fraction, run.device)
    latents = family.scale_latents(c.vae, run.latent_mean[:1])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(run.device)
    restore = [(m, m.processor) for m in processors]
    modules = list(c.trainable_modules().values())
    modes = [m.training for m in modules]
    try:
        for module in modules:
            module.eval()
        for module, processor in processors.items():
            module.set_processor(processor)
        with run.autocast():
            run.predict(family.noised(sched, latents, noise, t), t, run.conditioning(input_ids))
    finally:
        for module, previous in restore:
            module.set_processor(previous)
        for module, mode in zip(modules, modes):
            module.train(mode)
    return positions


@torch.no_grad()
def handle_attention_maps(run, res: int | None = None, timestep: int | None = None, seed: int = 0) -> torch.Tensor:
    """(N, res, res): each handle's cross-attention map on the input image, as the loss sees it.

    The prompt names every handle; the image's latents are noised to ``timestep`` (default 40% of
    the training schedule) with a fixed seed, so maps from different phases compare.  Maps are
    averaged over the layers at ``res`` and their heads and divided by their max.  The training
    random generators are not touched.
    """
    res, chosen = loss_layers(run, res)
    store = AttentionStore(without_grad=True)
    store.forwards.append((None, []))
    processor = run.family.capture_processor(store)
    positions = probe_forward(run, {module: processor for module, _ in chosen.values()}, timestep=timestep, seed=seed)
    sides = [r for _, r in chosen.values()]
    return token_maps(store.forwards[0][1], sides, positions, res)[0].float()


class CrossAttentionLoss(LossTerm):
    name = "attention"
    EXTRAS_KEY = "attention-probabilities"

    def __init__(self, config):
        self.weight = config.options.get("attention_loss_weight", 0.01)
        self.requested_res = config.options.get("attention_res")
        self.store = AttentionStore()
        self._restore: list[tuple[torch.nn.Module, object]] = []
        self._hook = None

    def setup(self, run) -> None:
        self.res, chosen = loss_layers(run, self.requested_res)
        self.layer_names = sorted(chosen)
        self.sides = [chosen[n][1] for n in self.layer_names]
        processor = run.family.capture_processor(self.store)
        for name in self.layer_names:
            module = chosen[name][0]
            self._restore.append((module, module.processor))
            module.set_processor(processor)
        self._hook = run.components.denoiser.register_forward_pre_hook(self.store.begin_forward, with_kwargs=True)

    def teardown(self, run) -> None:
        for module, processor in self._restore:
            module.set_processor(processor)
        self._restore.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.store.clear()

    def token_probabilities(self, batch: StepBatch) -> torch.Tensor:
        """(B, K, res, res): each shown handle's attention probabilities this step, averaged over
        layers and heads.  Kept in ``batch.extras`` so other terms of the step (attention-contrast)
        read the same maps whichever term runs first."""
        key = (self.EXTRAS_KEY, id(self))
        if key not in batch.extras:
            maps = self.store.maps_for(batch.conditioning.hidden_states)
            if not maps:
                raise RuntimeError("no attention maps were captured for this step's forward pass")
            batch.extras[key] = token_probabilities(maps, self.sides, batch.token_positions, self.res)
        return batch.extras[key]

    def token_maps(self, batch: StepBatch) -> torch.Tensor:
        """(B, K, res, res): each shown handle's map, averaged over layers and heads, divided by its max."""
        return normalised(self.token_probabilities(batch))

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
        click.Option(["--attention-res"], type=int, default=None,
                     help="Side of the attention maps compared with the masks [default: a quarter of the latent side and at least the paper's 16, "
                          "snapped to one the model has: 16 for SD at 512 px and for bas-mini, 32 for SDXL at 1024 px]."),
    ]


@hookimpl
def bas_register_loss_terms(register):
    register("attention", CrossAttentionLoss, description="MSE between handle cross-attention maps and masks (16x16 at 512 px, as the paper)")
