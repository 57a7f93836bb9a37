"""The method's parts in isolation: masked loss, attention capture, union sampling."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from bas.core.components import StepBatch
from bas.core.family import Components, Conditioning
from bas.demo.tiny import build_tiny_pipeline
from bas.plugins.attention_loss import CrossAttentionLoss
from bas.plugins.masked_loss import MaskedDiffusionLoss
from bas.plugins.sd import StableDiffusion
from bas.plugins.union_sampling import union_sampler
from bas.core.training import PROMPT_PREFIX


def make_batch(pred, target, union_mask, masks=None, positions=(5,), ehs=None):
    return StepBatch(
        step=1, phase=1, concepts=[0], prompt="", latents=target, noise=target, timesteps=torch.tensor([10]),
        noisy_latents=target, target=target, model_pred=pred, masks=masks if masks is not None else union_mask,
        union_mask=union_mask, token_positions=list(positions), conditioning=Conditioning(ehs),
    )


def config(**options):
    return SimpleNamespace(options=options)


def half_mask(size=64):
    mask = torch.zeros(1, 1, size, size)
    mask[..., :, : size // 2] = 1.0  # left half of the image
    return mask


def test_masked_loss_is_blind_outside_the_mask():
    torch.manual_seed(0)
    pred, target = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    loss = MaskedDiffusionLoss(config())
    base = loss(make_batch(pred, target, half_mask()))
    outside = pred.clone()
    outside[..., 4:] += 100.0  # right half of the latent: outside the mask
    assert torch.equal(loss(make_batch(outside, target, half_mask())), base)
    inside = pred.clone()
    inside[..., :4] += 1.0
    assert loss(make_batch(inside, target, half_mask())) > base
    # the reference formulation: plain mean over all latent elements of the masked difference
    expected = ((pred - target)[..., :4] ** 2).sum() / pred.numel()
    torch.testing.assert_close(base, expected)


def test_unmasked_and_area_normalised_variants():
    torch.manual_seed(0)
    pred, target = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = MaskedDiffusionLoss(config(mask_loss=False))(make_batch(pred, target, half_mask()))
    torch.testing.assert_close(plain, F.mse_loss(pred, target))
    normalised = MaskedDiffusionLoss(config(normalize_mask_area=True))(make_batch(pred, target, half_mask()))
    torch.testing.assert_close(normalised, ((pred - target)[..., :4] ** 2).mean())


def test_soft_masks_weight_the_loss():
    pred, target = torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    soft = torch.full((1, 1, 64, 64), 0.5)
    torch.testing.assert_close(MaskedDiffusionLoss(config())(make_batch(pred, target, soft)), torch.tensor(0.25))


@pytest.fixture(scope="module")
def tiny_parts():
    pipe = build_tiny_pipeline(seed=0, sample_size=16)
    return pipe.unet.eval(), pipe.text_encoder.eval(), pipe.tokenizer


def sd_run(unet, resolution):
    """What the loss reads of a run: its family, its parts, its resolution."""
    family = StableDiffusion()
    return SimpleNamespace(family=family, resolution=resolution, components=Components(family, [], unet, SimpleNamespace(config=SimpleNamespace(block_out_channels=(1, 2, 3, 4))), None))


def test_loss_layers_are_the_down_and_up_cross_attentions_at_a_quarter_of_the_latent(tiny_parts):
    unet, _, _ = tiny_parts
    run = sd_run(unet, 512)
    layers = run.family.attention_layers(run.components, 64)  # 512 px on SD: 64x64 latents
    at16 = sorted(n for n, (_, r) in layers.items() if r == 16)
    assert at16 and all(n.startswith(("down_blocks.2.", "up_blocks.1.")) for n in at16)
    assert not any(n.startswith("mid_block") for n in layers)


def explicit_probabilities(unet, names):
    """Reference maps: softmax(QK^T * scale) per head from a plain (non-fused) computation."""
    captured = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            hs = args[0]
            ehs = kwargs["encoder_hidden_states"]
            q = module.head_to_batch_dim(module.to_q(hs))
            k = module.head_to_batch_dim(module.to_k(ehs))
            probs = module.get_attention_scores(q, k, None)  # (B*heads, Q, T)
            captured[name] = probs.view(hs.shape[0], module.heads, *probs.shape[1:]).mean(dim=1)
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in unet.named_modules() if n in names]
    return captured, handles


def test_captured_maps_are_softmax_probabilities_of_the_right_tokens(tiny_parts):
    unet, text_encoder, tokenizer = tiny_parts
    torch.manual_seed(0)
    latent = 16
    term = CrossAttentionLoss(config(attention_loss_weight=0.01, attention_res=None))
    run = sd_run(unet, latent * 8)
    noisy = torch.randn(1, 4, latent, latent)
    ids = tokenizer(["a photo of red and blue"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ehs = text_encoder(ids)[0]
    t = torch.tensor([500])
    with torch.no_grad():
        fused_out = unet(noisy, t, encoder_hidden_states=ehs).sample
    term.setup(run)
    try:
        assert term.res == 16  # the paper's 16x16, not a quarter of this 16x16 latent
        reference, hooks = explicit_probabilities(unet, set(term.layer_names))
        out = unet(noisy, t, encoder_hidden_states=ehs).sample
        for h in hooks:
            h.remove()
        # the capturing processor computes the same attention output as the fused kernel
        torch.testing.assert_close(out, fused_out, rtol=1e-4, atol=1e-5)
        maps = term.store.maps_for(ehs)
        assert len(maps) == len(term.layer_names)
        for name, m in zip(term.layer_names, maps):
            assert m.shape == (1, term.res * term.res, 77)
            torch.testing.assert_close(m.sum(-1), torch.ones(1, term.res * term.res))
            torch.testing.assert_close(m, reference[name], rtol=1e-4, atol=1e-6)
        positions = [4, 6]  # "red" and "blue"
        batch = make_batch(out, out, torch.ones(1, 1, 128, 128), masks=torch.ones(1, 2, 128, 128), positions=positions, ehs=ehs)
        token_maps = term.token_maps(batch)
        stacked = torch.stack([reference[n] for n in term.layer_names]).mean(0)[:, :, positions]
        expected = stacked.permute(0, 2, 1).reshape(1, 2, term.res, term.res)
        expected = expected / expected.amax(dim=(-2, -1), keepdim=True)
        torch.testing.assert_close(token_maps, expected, rtol=1e-4, atol=1e-6)
        assert term(batch) >= 0 and term.store.forwards == []  # the store is emptied every step
        with torch.no_grad():
            unet(noisy, t, encoder_hidden_states=ehs)
        assert term.store.forwards == []  # sampling without gradients records nothing
    finally:
        term.teardown(run)
    assert not any(type(m.processor).__name__ == "CaptureCrossAttention" for n, m in unet.named_modules() if n.endswith("attn2"))


def test_attention_loss_is_zero_when_maps_match_masks(tiny_parts):
    term = CrossAttentionLoss(config())
    term.res, term.sides = 4, [4]  # one captured layer at 4x4
    masks = torch.zeros(1, 1, 32, 32)
    masks[..., :16, :16] = 1.0
    map_ = F.interpolate(masks, size=(4, 4), mode="area").reshape(1, 16)
    ehs = torch.zeros(1)
    probs = torch.zeros(1, 16, 77)
    probs[:, :, 3] = map_ * 0.3  # any scale: maps are divided by their max
    term.store.forwards.append((ehs, [probs]))
    batch = make_batch(None, None, masks, masks=masks, positions=[3], ehs=ehs)
    assert float(term(batch)) == pytest.approx(0.0, abs=1e-7)


def test_union_sampling_draws_non_empty_distinct_subsets_in_random_order():
    sample = union_sampler(None, 3)
    rng = random.Random(0)
    draws = [sample(rng) for _ in range(3000)]
    assert all(1 <= len(d) <= 3 and len(set(d)) == len(d) and set(d) <= {0, 1, 2} for d in draws)
    sizes = [sum(len(d) == k for d in draws) for k in (1, 2, 3)]
    assert all(abs(s / 3000 - 1 / 3) < 0.05 for s in sizes)  # k uniform over 1..N
    assert {tuple(d) for d in draws if len(d) == 3} == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}
    assert union_sampler(None, 1)(rng) == [0]


def test_prompt_follows_the_method():
    from bas.core.training import Run

    fake = SimpleNamespace(tokens=["<asset0>", "<asset1>", "<asset2>"])
    assert Run.prompt_for(fake, [2, 0]) == PROMPT_PREFIX + "<asset2> and <asset0>" == "a photo of <asset2> and <asset0>"


def two_halves(size=32):
    """Masks (1, 2, size, size): concept 0 the left half, concept 1 the right half."""
    masks = torch.zeros(1, 2, size, size)
    masks[0, 0, :, : size // 2] = 1.0
    masks[0, 1, :, size // 2 :] = 1.0
    return masks


def test_attention_contrast_rewards_each_handle_out_attending_the_other_on_its_own_mask():
    from bas.plugins.attention_contrast import contrast_loss

    masks = two_halves()
    own = torch.full((1, 2, 4, 4), 0.01)
    own[0, 0, :, :2], own[0, 1, :, 2:] = 0.3, 0.3  # each handle on its own half
    swapped = own.flip(1)  # each handle on the other's half: the colour-swap picture
    assert float(contrast_loss(own, masks)) < 0.1 < float(contrast_loss(swapped, masks))
    # the exact value: at every owned pixel the owner holds 0.3 of 0.31 of the shown handles' attention
    assert float(contrast_loss(own, masks)) == pytest.approx(-torch.log(torch.tensor(0.3 / 0.31)).item(), rel=1e-5)
    # the scale of the probabilities does not count, only each handle's share
    assert float(contrast_loss(own * 0.1, masks)) == pytest.approx(float(contrast_loss(own, masks)), rel=1e-5)


def test_attention_contrast_ignores_pixels_no_mask_or_two_masks_own():
    from bas.plugins.attention_contrast import contrast_loss

    masks = torch.zeros(1, 2, 32, 32)
    masks[0, 0, :, :16] = 1.0  # left half
    masks[0, 1, :, 8:24] = 1.0  # the middle: 8:16 belongs to both, 24: to neither
    probs = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.01
    base = contrast_loss(probs, masks)
    moved = probs.clone()
    moved[..., 1] *= 7.0  # columns 8:16 at 4x4: both masks cover them
    moved[0, 0, :, 3] *= 5.0  # columns 24:32: no mask covers them
    torch.testing.assert_close(contrast_loss(moved, masks), base)
    moved[0, 1, :, 0] *= 5.0  # column 0: only concept 0's mask: this counts
    assert not torch.allclose(contrast_loss(moved, masks), base)


def test_attention_contrast_adds_nothing_when_one_handle_is_shown():
    from bas.plugins.attention_contrast import contrast_loss

    probs = torch.rand(1, 1, 4, 4, requires_grad=True)
    loss = contrast_loss(probs, torch.ones(1, 1, 32, 32))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    disjoint_nothing_owned = torch.zeros(1, 2, 32, 32)  # no mask covers half of any cell
    assert float(contrast_loss(torch.rand(1, 2, 4, 4), disjoint_nothing_owned)) == 0.0
