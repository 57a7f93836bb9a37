"""Do bas's files load in an older diffusers/transformers/peft stack as they do in bas's own?

Step 1, in bas's environment: writes tiny models (SD 2.x-like with linear projections, SD 1.x-like
with 1x1-convolution projections, a v-prediction one, and SDXL's layout with two text encoders),
LoRA runs (alpha != rank), full fine-tunes, their diffusers, kohya and lora-from-full exports, and
what bas's stack computes with them (loading them there too, with the same checks):

    python tools/old_stack_check.py make DIR

Step 2, in a venv with the older stack (only torch, diffusers, transformers, peft, safetensors;
bas itself is not imported), for example:

    python3 -m venv /tmp/old && /tmp/old/bin/pip install torch==2.13.0 diffusers==0.30.3 \\
        transformers==4.44.2 peft==0.12.0 "accelerate<1.1" "numpy<2.2" safetensors pillow
    /tmp/old/bin/python tools/old_stack_check.py load DIR

It loads every file as a user of that stack would (``from_pretrained``, ``load_lora_weights``,
``load_textual_inversion``), counts the LoRA layers that arrived against those in the file (and
prints the counts), reads the text encoders' missing and unexpected keys, checks that each handle's
rows arrived in every text encoder, and compares the tokenizers' ids, the text encoders' and UNet's
outputs with bas's.  SDXL is loaded as its users do: ``StableDiffusionXLPipeline``, the LoRA on the
UNet and both text encoders, each embedding file's ``clip_l`` and ``clip_g`` rows loaded with one
``load_textual_inversion`` call per encoder (``text_encoder_2``/``tokenizer_2`` for the second), and
the second encoder pooling the end-of-text token as the model card's snippet sets it; its outputs
are both encoders' penultimate states, the pooled projection and the UNet's prediction with SDXL's
size conditioning, and a 2-step sample through the pipeline itself.  Exit status 1 when anything
differs.  (diffusers before 0.31 refuses ``load_lora_weights(folder)`` under ``HF_HUB_OFFLINE=1``;
leave it unset, nothing is downloaded.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROMPTS = ["a photo of a ball", "a photo of <asset0> and <asset1> at the beach"]


# (name, file or folder to load_lora_weights, base model, run whose handles to load or None)
LORAS = [
    ("lora", "lora-run/lora", "tiny", "lora-run"),
    ("kohya", "kohya/scene.safetensors", "tiny", "lora-run"),
    ("lora-from-full", "lora-from-full/lora", "tiny", None),
    ("kohya-full", "kohya-full/full.safetensors", "tiny", None),
    ("lora-from-full-sd1", "lora-from-full-sd1/lora", "tiny-sd1", None),
    ("lora-v", "lora-v-run/lora", "tiny-v", "lora-v-run"),
]
# SDXL: (name, file or folder to load_lora_weights, embeddings folder, run whose handles they hold)
SDXL_LORAS = [
    ("xl-lora", "xl-lora-run/lora", "xl-lora-run/embeddings", "xl-lora-run"),
    ("xl-diffusers", "xl-diffusers/lora", "xl-diffusers/embeddings", "xl-lora-run"),
    ("xl-kohya", "xl-kohya/scene.safetensors", "xl-kohya/embeddings", "xl-lora-run"),
    ("xl-lora-from-full", "xl-lora-from-full/lora", "xl-lora-from-full/embeddings", "xl-full-run"),
    ("xl-kohya-full", "xl-kohya-full/full.safetensors", "xl-kohya-full/embeddings", "xl-full-run"),
]
# kohya's and diffusers' key prefixes of each component (SD's text encoder: lora_te_, SDXL's: lora_te1_/lora_te2_)
PREFIXES = {"unet": ("unet.", "lora_unet_"), "text_encoder": ("text_encoder.", "lora_te_", "lora_te1_"),
            "text_encoder_2": ("text_encoder_2.", "lora_te2_")}


def make(root: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from bas.core.api import extract
    from bas.demo.demo import draw_scene
    from bas.exports.export import export_run
    from bas.exports.formats import save_pipeline
    from bas.demo.tiny import build_tiny_pipeline, save_tiny_model
    from bas.plugins.sdxl import StableDiffusionXL

    tiny = save_tiny_model(root / "tiny")
    tiny_v = save_tiny_model(root / "tiny-v", seed=1, prediction_type="v_prediction")
    pipe = build_tiny_pipeline(seed=0)  # SD 1.x's layout: proj_in/proj_out are 1x1 convolutions
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "use_linear_projection": False})
    save_pipeline(StableDiffusionPipeline(**{**pipe.components, "unet": unet}), root / "tiny-sd1")
    scene = draw_scene(root / "scene")
    masks = sorted(scene.glob("mask*.png"))
    quick = dict(phase1_steps=2, phase2_steps=2, overwrite=True, device="cpu", quiet=True)
    full = dict(quick, plugins=["full"], phase2_lr=1e-3)
    extract(scene / "img.png", masks, root / "lora-run", model=str(tiny), lora_alpha=4.0, **quick)
    extract(scene / "img.png", masks, root / "lora-v-run", model=str(tiny_v), lora_alpha=4.0, **quick)
    extract(scene / "img.png", masks, root / "full-run", model=str(tiny), **full)
    extract(scene / "img.png", masks, root / "full-sd1-run", model=str(root / "tiny-sd1"), **full)
    export_run(root / "lora-run", "kohya", root / "kohya", name="scene", preview=False, overwrite=True)
    export_run(root / "full-run", "lora-from-full", root / "lora-from-full", rank=16, preview=False, overwrite=True)
    export_run(root / "full-run", "kohya", root / "kohya-full", name="full", rank=16, preview=False, overwrite=True)
    export_run(root / "full-sd1-run", "lora-from-full", root / "lora-from-full-sd1", rank=16, preview=False, overwrite=True)
    tiny_xl = save_tiny_model(root / "tiny-xl", family=StableDiffusionXL())  # as `bas tiny-model DIR --family sdxl`
    extract(scene / "img.png", masks, root / "xl-lora-run", model=str(tiny_xl), lora_alpha=4.0, **quick)
    extract(scene / "img.png", masks, root / "xl-full-run", model=str(tiny_xl), **full)
    export_run(root / "xl-lora-run", "diffusers", root / "xl-diffusers", preview=False, overwrite=True)
    export_run(root / "xl-lora-run", "kohya", root / "xl-kohya", name="scene", preview=False, overwrite=True)
    export_run(root / "xl-full-run", "lora-from-full", root / "xl-lora-from-full", rank=16, preview=False, overwrite=True)
    export_run(root / "xl-full-run", "kohya", root / "xl-kohya-full", name="full", rank=16, preview=False, overwrite=True)
    subprocess.run([sys.executable, __file__, "load", str(root), "--reference"], check=True)


def load(root: Path, reference: bool) -> int:
    import diffusers
    import peft
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    results: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    stack = f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}"

    def pipeline(path, xl=False):
        if xl:
            pipe = StableDiffusionXLPipeline.from_pretrained(str(path), add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def text_encoder_keys(path, what, cls=CLIPTextModel):
        _, info = cls.from_pretrained(str(path), output_loading_info=True)
        problems.extend(f"{what}: {kind} {sorted(map(str, keys))[:3]}" for kind, keys in info.items() if keys)

    def tokenize(tokenizer):
        return tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids

    def latents(unet):
        c = unet.config
        return torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def forward(pipe, name):
        ids = tokenize(pipe.tokenizer)
        hidden = pipe.text_encoder(ids)[0]
        results.update({f"{name}.ids": ids, f"{name}.text": hidden,
                        f"{name}.unet": pipe.unet(latents(pipe.unet), torch.tensor([500, 10]), encoder_hidden_states=hidden).sample})

    @torch.no_grad()
    def forward_xl(pipe, name):
        """What SDXL's pipeline computes from a prompt (both penultimate states, encoder 2's pooled projection, the
        size conditioning), the UNet's prediction from it, and a 2-step sample through the pipeline."""
        ids = [tokenize(pipe.tokenizer), tokenize(pipe.tokenizer_2)]
        out = pipe.text_encoder(ids[0], output_hidden_states=True)
        out_2 = pipe.text_encoder_2(ids[1], output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled = out_2.text_embeds
        end = (ids[1] == pipe.tokenizer_2.eos_token_id).int().argmax(-1)
        at_end = pipe.text_encoder_2.text_projection(out_2.last_hidden_state[torch.arange(len(PROMPTS)), end])
        if not torch.allclose(pooled, at_end, atol=1e-6):
            problems.append(f"{name}: text_encoder_2 pools another token than the end of the prompt")
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        time_ids = torch.tensor([[side, side, 0, 0, side, side]] * len(PROMPTS), dtype=torch.float32)
        unet = pipe.unet(latents(pipe.unet), torch.tensor([500, 10]), encoder_hidden_states=hidden,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        image = pipe(PROMPTS[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        results.update({f"{name}.ids": ids[0], f"{name}.ids_2": ids[1], f"{name}.text": hidden, f"{name}.pooled": pooled,
                        f"{name}.unet": unet, f"{name}.image": torch.from_numpy(image)})

    def lora(pipe, path, what):
        pipe.load_lora_weights(str(path))
        file = path if path.suffix == ".safetensors" else path / "pytorch_lora_weights.safetensors"
        downs = [k for k in load_file(str(file)) if k.endswith(("lora_A.weight", "down.weight"))]  # .lora_down, .lora.down, _lora.down
        counts = []
        for component, prefixes in PREFIXES.items():
            if not hasattr(pipe, component):
                continue
            loaded = sum(1 for _, m in getattr(pipe, component).named_modules() if len(getattr(m, "lora_A", ())) > 0)
            in_file = sum(k.startswith(prefixes) for k in downs)
            counts.append(f"{component} {loaded} of {in_file}")
            if loaded != in_file or not in_file:
                problems.append(f"{what}: {loaded} of the {in_file} {component} LoRA layers loaded")
        print(f"  {what:20s} LoRA layers adapted: {', '.join(counts)}")

    def embeddings(pipe, run):
        for f in sorted((run / "embeddings").glob("*.safetensors")):
            pipe.load_textual_inversion(str(f))
        rows = pipe.text_encoder.get_input_embeddings().weight
        for token, row in load_file(str(run / "handles.safetensors")).items():
            if not torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids(token)], row):
                problems.append(f"{run.name}: textual inversion {token} differs")

    def handle_rows(pipe, run, what):
        """Each handle's row in each text encoder is the run's (handles.safetensors: ``<asset0>`` for encoder 1,
        ``text_encoder_2.<asset0>`` for encoder 2); returns how many rows were checked."""
        checked = 0
        for key, row in load_file(str(run / "handles.safetensors")).items():
            encoder, tokenizer = (pipe.text_encoder_2, pipe.tokenizer_2) if key.startswith("text_encoder_2.") else (pipe.text_encoder, pipe.tokenizer)
            token = key.removeprefix("text_encoder_2.")
            ids = tokenizer(token, add_special_tokens=False).input_ids
            if len(ids) != 1 or not torch.equal(encoder.get_input_embeddings().weight[ids[0]], row):
                problems.append(f"{what}: the row of {token} in {'text_encoder_2' if encoder is pipe.text_encoder_2 else 'text_encoder'} differs from the run's")
            checked += 1
        return checked

    def embeddings_xl(pipe, folder, run, what):
        """Each SDXL embedding file ``{"clip_l": [1, 768], "clip_g": [1, 1280]}`` with one call per encoder."""
        files = sorted(folder.glob("*.safetensors"))
        for f in files:
            token = "<" + f.stem.rsplit("-", 1)[-1] + ">"  # asset0.safetensors; NAME-asset0.safetensors (kohya)
            state = load_file(str(f))
            pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        print(f"  {what:20s} textual inversions: {len(files)} files, {handle_rows(pipe, run, what)} handle rows equal to the run's")

    def end_of_text_pooling(pipe):  # the model card's line
        pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id

    print(stack)
    for model in ("tiny", "tiny-sd1", "tiny-v"):
        text_encoder_keys(root / model / "text_encoder", f"{model} model")
        forward(pipeline(root / model), model)
    for name, path, model, run in LORAS:
        pipe = pipeline(root / model)
        lora(pipe, root / path, name)
        if run is not None:
            embeddings(pipe, root / run)
        forward(pipe, name)
    for run in ("full-run", "full-sd1-run"):
        text_encoder_keys(root / run / "pipeline" / "text_encoder", f"{run} pipeline")
        forward(pipeline(root / run / "pipeline"), run)

    # SDXL
    for folder, what in ((root / "tiny-xl", "tiny-xl model"), (root / "xl-full-run" / "pipeline", "xl-full-run pipeline")):
        text_encoder_keys(folder / "text_encoder", what)
        text_encoder_keys(folder / "text_encoder_2", what + " (text_encoder_2)", CLIPTextModelWithProjection)
    pipe = pipeline(root / "tiny-xl", xl=True)
    end_of_text_pooling(pipe)
    forward_xl(pipe, "tiny-xl")
    for name, path, folder, run in SDXL_LORAS:
        pipe = pipeline(root / "tiny-xl", xl=True)
        lora(pipe, root / path, name)
        embeddings_xl(pipe, root / folder, root / run, name)
        end_of_text_pooling(pipe)
        forward_xl(pipe, name)
    pipe = pipeline(root / "xl-full-run" / "pipeline", xl=True)  # its handles and end-of-text pooling are in the pipeline
    print(f"  {'xl-full-run':20s} pipeline: {handle_rows(pipe, root / 'xl-full-run', 'xl-full-run pipeline')} handle rows equal to the run's")
    forward_xl(pipe, "xl-full-run")

    out = root / ("reference.safetensors" if reference else "older-stack.safetensors")
    save_file({k: v.contiguous() for k, v in results.items()}, str(out), metadata={"stack": stack})
    print(f"{stack}: {len(problems)} loading problems", *problems, sep="\n  ")
    if not reference:
        want = load_file(str(root / "reference.safetensors"))
        for key in sorted(want):
            diff = float((results[key].double() - want[key].double()).abs().max())
            print(f"  {key:24s} max |difference| to bas's stack {diff:.2e}")
            problems += [key] if diff > 1e-5 else []
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("make", "load"):
        sys.exit(__doc__)
    root = Path(sys.argv[2])
    if sys.argv[1] == "make":
        make(root)
    else:
        sys.exit(load(root, reference="--reference" in sys.argv))
