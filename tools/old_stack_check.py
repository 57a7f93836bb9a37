"""Do bas's files load in an older diffusers/transformers/peft stack as they do in bas's own?

Step 1, in bas's environment: writes tiny models (SD 2.x-like with linear projections, SD 1.x-like
with 1x1-convolution projections, a v-prediction one), LoRA runs (alpha != rank), full fine-tunes,
their kohya and lora-from-full exports, and what bas's stack computes with them (loading them there
too, with the same checks):

    python tools/old_stack_check.py make DIR

Step 2, in a venv with the older stack (only torch, diffusers, transformers, peft, safetensors;
bas itself is not imported), for example:

    python3 -m venv /tmp/old && /tmp/old/bin/pip install torch==2.13.0 diffusers==0.30.3 \\
        transformers==4.44.2 peft==0.12.0 "accelerate<1.1" "numpy<2.2" safetensors pillow
    /tmp/old/bin/python tools/old_stack_check.py load DIR

It loads every file as a user of that stack would (``from_pretrained``, ``load_lora_weights``,
``load_textual_inversion``), counts the LoRA layers that arrived against those in the file (and
prints the counts), reads the text encoder's missing and unexpected keys, and compares the text
encoder's and UNet's outputs with bas's.  Exit status 1 when anything differs.  (diffusers before
0.31 refuses ``load_lora_weights(folder)`` under ``HF_HUB_OFFLINE=1``; leave it unset, nothing is
downloaded.)
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


def make(root: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from bas.core.api import extract
    from bas.core.demo import draw_scene
    from bas.core.export import export_run
    from bas.core.formats import save_pipeline
    from bas.core.tiny import build_tiny_pipeline, save_tiny_model

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
    subprocess.run([sys.executable, __file__, "load", str(root), "--reference"], check=True)


def load(root: Path, reference: bool) -> int:
    import diffusers
    import peft
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    results: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    stack = f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}"

    def pipeline(path):
        pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def text_encoder_keys(path, what):
        _, info = CLIPTextModel.from_pretrained(str(path), output_loading_info=True)
        problems.extend(f"{what}: {kind} {sorted(map(str, keys))[:3]}" for kind, keys in info.items() if keys)

    @torch.no_grad()
    def forward(pipe, name):
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        c = pipe.unet.config
        latents = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(0))
        results.update({f"{name}.ids": ids, f"{name}.text": hidden,
                        f"{name}.unet": pipe.unet(latents, torch.tensor([500, 10]), encoder_hidden_states=hidden).sample})

    def lora(pipe, path, what):
        pipe.load_lora_weights(str(path))
        file = path if path.suffix == ".safetensors" else path / "pytorch_lora_weights.safetensors"
        downs = [k for k in load_file(str(file)) if k.endswith(("lora_A.weight", "down.weight"))]  # .lora_down, .lora.down, _lora.down
        counts = []
        for component, prefixes in (("unet", ("unet.", "lora_unet_")), ("text_encoder", ("text_encoder.", "lora_te_"))):
            loaded = sum(1 for _, m in getattr(pipe, component).named_modules() if len(getattr(m, "lora_A", ())) > 0)
            in_file = sum(k.startswith(prefixes) for k in downs)
            counts.append(f"{component} {loaded} of {in_file}")
            if loaded != in_file:
                problems.append(f"{what}: {loaded} of the {in_file} {component} LoRA layers loaded")
        print(f"  {what:20s} LoRA layers adapted: {', '.join(counts)}")

    def embeddings(pipe, run):
        for f in sorted((run / "embeddings").glob("*.safetensors")):
            pipe.load_textual_inversion(str(f))
        rows = pipe.text_encoder.get_input_embeddings().weight
        for token, row in load_file(str(run / "handles.safetensors")).items():
            if not torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids(token)], row):
                problems.append(f"{run.name}: textual inversion {token} differs")

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
