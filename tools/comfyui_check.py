"""Do bas's LoRA files load fully in ComfyUI?  Runs ComfyUI's own LoRA loading on SD 1.5 and SD 2.1.

    git clone https://github.com/comfyanonymous/ComfyUI /tmp/ComfyUI
    pip install --target /tmp/comfy-deps einops torchsde trampoline   # ComfyUI's imports bas's venv lacks
    python tools/comfyui_check.py /tmp/ComfyUI /tmp/comfy-deps

For SD 1.5, SD 2.1 base and SD 2.1 768-v (v-prediction) at their real sizes, on the meta device (no
weights are needed or downloaded), it writes with bas's writers (``bas.core.formats``) the
diffusers-layout and kohya files of

- a LoRA run: the layers ``bas run``'s LoRA adapts (the UNet's attention projections, the text
  encoder's ``q/k/v/out_proj``), rank 4 with alpha 2;
- a low-rank difference (``--format lora-from-full``, and ``kohya`` of a full fine-tune): every
  layer kohya's extraction covers (attention, feed-forward, ``proj_in``/``proj_out``, which are 1x1
  convolutions in SD 1.5; the text encoder's attention and MLP), ranks 4 and 2 mixed;

with random factors.  ComfyUI's model detection (``unet_config_from_diffusers_unet``) picks the
model's config from the UNet's diffusers layout, ``BaseModel`` and the config's CLIP model are built
as ComfyUI builds them, and each file is loaded as ComfyUI's LoraLoader node does
(``load_torch_file``, ``comfy.sd.load_lora_for_models``).  The check counts the keys ComfyUI logs as
not loaded, the weights it patches, and compares each patched weight's change (ComfyUI's
``calculate_weight`` on a zero weight) with the layer's ``alpha / rank * up @ down``.  Exit status 1
when any key is left out or any change differs.  ComfyUI's optional media packages (torchvision, av,
...) are replaced by empty stand-ins: its LoRA code does not use them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA_RUN_LAYERS = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}
MODELS = [("SD 1.5", "sd15", "eps"), ("SD 2.1 base", "sd21", "eps"), ("SD 2.1 768-v", "sd21", "v")]
MEDIA = {"torchvision", "torchaudio", "av", "kornia", "spandrel", "sentencepiece", "aiohttp"}


def bas_files(preset: str, directory: Path) -> tuple[dict, dict, dict]:
    """``({file: (kind, path, layers)}, {(kind, component, module): (scale, up, down)}, UNet shapes)``: the
    LoRA files bas writes for ``preset``'s layout; the UNet's shapes are for ComfyUI's model detection."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bas.core.formats import LoraLayer, kohya_targets, standard_module, write_diffusers_lora, write_kohya_lora
    from benchmarks.presets import CLIP_VOCAB_SIZE, PRESETS

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**PRESETS[preset].unet),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, **PRESETS[preset].text))}
    g = torch.Generator().manual_seed(0)
    files, changes = {}, {}
    for kind in ("lora-run", "low-rank-difference"):
        layers = []
        for component, model in models.items():
            for name, m in model.named_modules():
                if kind == "lora-run":
                    if not isinstance(m, torch.nn.Linear) or not name.endswith(LORA_RUN_LAYERS[component]):
                        continue
                    rank, alpha = 4, 2.0
                elif kohya_targets(component, name, m):
                    rank = 2 if len(layers) % 5 == 0 else 4
                    alpha = float(rank)
                else:
                    continue
                shape = m.weight.shape
                down = torch.randn(rank, *shape[1:], generator=g) * 0.1
                up = torch.randn(shape[0], rank, *shape[2:], generator=g) * 0.1
                layers.append(LoraLayer(component, name, down, up, alpha))
                changes[(kind, component, standard_module(component, name))] = (alpha / rank, up, down)
        write_diffusers_lora(layers, directory / kind)
        files[f"{kind} (diffusers)"] = (kind, directory / kind / "pytorch_lora_weights.safetensors", len(layers))
        write_kohya_lora(layers, directory / f"{kind}.safetensors", {})
        files[f"{kind} (kohya)"] = (kind, directory / f"{kind}.safetensors", len(layers))
    unet_shapes = {k: v.shape for k, v in models["unet"].state_dict().items()}
    return files, changes, unet_shapes


class _StandIn(types.ModuleType):
    __path__: list = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


class _MediaStandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in MEDIA:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandIn(spec.name)

    def exec_module(self, module):
        pass


class _Log(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(comfyui: Path, deps: Path | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        for _, preset, _ in MODELS:  # bas, diffusers and transformers first: they must not see the stand-ins
            if preset not in built:
                (Path(tmp) / preset).mkdir()
                built[preset] = bas_files(preset, Path(tmp) / preset)
        sys.path[:0] = [str(comfyui)] + ([str(deps)] if deps else [])
        sys.meta_path.insert(0, _MediaStandIns())
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.lora
        import comfy.model_base
        import comfy.model_detection
        import comfy.model_patcher
        import comfy.sd
        import comfy.utils

        log = _Log()
        logging.getLogger().addHandler(log)
        cpu = torch.device("cpu")
        failures = 0
        for title, preset, prediction in MODELS:
            files, changes, unet_shapes = built[preset]
            unet_config = comfy.model_detection.unet_config_from_diffusers_unet({k: torch.empty(s, device="meta") for k, s in unet_shapes.items()})
            model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
            model_type = comfy.model_base.ModelType.V_PREDICTION if prediction == "v" else comfy.model_base.ModelType.EPS
            model = comfy.model_base.BaseModel(model_config, model_type=model_type, device=torch.device("meta"))
            clip_model = model_config.clip_target().clip(device=torch.device("meta"))
            clip = comfy.sd.CLIP(no_init=True)
            clip.patcher = comfy.model_patcher.ModelPatcher(clip_model, load_device=cpu, offload_device=cpu)
            clip.cond_stage_model, clip.tokenizer, clip.layer_idx, clip.tokenizer_options = clip_model, None, None, {}
            clip.use_clip_schedule, clip.apply_hooks_to_conds = False, None
            patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
            # ComfyUI's names of the weights bas's modules are: its diffusers-to-ldm UNet table, the CLIP model's prefix
            unet_names = {k: "diffusion_model." + v for k, v in comfy.utils.unet_to_diffusers(model_config.unet_config).items()}
            clip_prefix = next(k for k in clip_model.state_dict() if ".transformer.text_model." in k).split(".transformer.")[0] + ".transformer."
            print(f"{title}: ComfyUI detects {type(model_config).__name__}, {model_type.name}, {type(clip_model).__name__}")
            for name, (kind, path, n_layers) in files.items():
                log.lines.clear()
                lora = comfy.utils.load_torch_file(str(path), safe_load=True)
                new_model, new_clip = comfy.sd.load_lora_for_models(patcher, clip, lora, 1.0, 1.0)
                patched = {**{k: (new_model, v) for k, v in new_model.patches.items()},
                           **{k: (new_clip.patcher, v) for k, v in new_clip.patcher.patches.items()}}
                worst = 0.0
                for (k, component, module), (scale, up, down) in changes.items():
                    if k != kind:
                        continue
                    change = (scale * up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
                    key = unet_names[module + ".weight"] if component == "unet" else clip_prefix + module + ".weight"
                    if key not in patched:
                        worst = float("inf")
                        continue
                    got = comfy.lora.calculate_weight(patched[key][1], torch.zeros(change.shape), key)
                    worst = max(worst, float((got - change).abs().max()))
                skipped = [line for line in log.lines if "not loaded" in line.lower() or "mismatch" in line.lower()]
                ok = not skipped and len(patched) == n_layers and worst < 1e-5
                failures += not ok
                print(f"  {name:32s} {len(lora):4d} keys, {len(skipped)} not loaded; {len(patched)} of {n_layers} layers patched "
                      f"(UNet {len(new_model.patches)}, CLIP {len(new_clip.patcher.patches)}); max |change - alpha/rank up@down| {worst:.1e}"
                      + ("" if ok else "  FAIL"))
                for line in skipped[:3]:
                    print("    " + line)
        return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
