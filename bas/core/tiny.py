"""A tiny random Stable-Diffusion-architecture pipeline, built and saved offline.

Same structure as SD 2.x (4 UNet levels with cross-attention on the first three, linear
projections, an 8x VAE, a CLIP text model, a CLIP BPE tokenizer) at a size that trains in
milliseconds per step on a CPU.  Tests and ``bas demo`` use it; it shows plumbing, not fidelity.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bas.core import io

# Words that become single tokens, so prompts and --init-token behave like a real CLIP vocabulary.
WORDS = (
    "a an the of and at in on with photo picture image object thing toy animal person dog cat bird bear "
    "chicken creature ball cube box circle square triangle star red green blue yellow orange purple pink "
    "white black grey brown striped dotted beach snow forest city background sitting standing big small"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (from the GPT-2/CLIP BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces CLIP's BPE makes of ``word`` with merge ``ranks`` (lowest rank merges first)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def write_tokenizer(directory: Path, words=WORDS) -> None:
    """vocab.json + merges.txt of a small CLIP BPE: every byte, and whole-word tokens for ``words``."""
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for piece in pieces[1:]:
            merge = f"{left} {piece}"
            left = left + piece
            if merge not in merges:
                merges.append(merge)
            if left not in vocab:
                vocab.append(left)
    for word in words:  # a later word's merges can split an earlier one: join what the BPE leaves, in order
        pieces = _bpe(word, {tuple(m.split()): i for i, m in enumerate(merges)})
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16):
    """The tiny pipeline in memory; ``sample_size`` is the latent size (x8 for pixels)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    import tempfile

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 8, 8),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size * 8,
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, projection_dim=32,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_model(directory: Path, seed: int = 0, prediction_type: str = "epsilon", family=None) -> Path:
    """Write a tiny pipeline in diffusers format (safetensors) to ``directory``, atomically: this
    module's (Stable Diffusion's layout), or ``family``'s (a :class:`bas.core.family.ModelFamily`)."""
    from bas.core.formats import save_pipeline

    pipe = family.tiny_pipeline(seed, prediction_type) if family else build_tiny_pipeline(seed=seed, prediction_type=prediction_type)
    directory = Path(directory)
    with io.atomic_path(directory, directory=True) as tmp:
        save_pipeline(pipe, tmp)  # loadable by transformers 4.x too
    return directory
