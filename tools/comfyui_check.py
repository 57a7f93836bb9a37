"""Do bas's LoRA and embedding files load fully in ComfyUI?  Runs ComfyUI's own LoRA and embedding loading
on SD 1.5, SD 2.1 and SDXL.

    git clone https://github.com/comfyanonymous/ComfyUI /tmp/ComfyUI
    pip install --target /tmp/comfy-deps einops torchsde trampoline   # ComfyUI's imports bas's venv lacks
    python tools/comfyui_check.py /tmp/ComfyUI /tmp/comfy-deps

For SD 1.5, SD 2.1 base, SD 2.1 768-v (v-prediction) and SDXL base 1.0 at their real sizes, on the meta
device (no weights are needed or downloaded), it writes with bas's writers (``bas.exports.formats``, the
model family's kohya prefixes: ``lora_te_`` for SD, ``lora_te1_``/``lora_te2_`` for SDXL) the
diffusers-layout and kohya files of

- a LoRA run: the layers ``bas run``'s LoRA adapts (the family's ``lora_targets``: the UNet's attention
  projections, every text encoder's ``q/k/v/out_proj``), rank 4 with alpha 2;
- a low-rank difference (``--format lora-from-full``, and ``kohya`` of a full fine-tune): every
  layer kohya's extraction covers (attention, feed-forward, ``proj_in``/``proj_out``, which are 1x1
  convolutions in SD 1.5; the text encoders' attention and MLP), ranks 4 and 2 mixed;

with random factors, and two handles' embeddings in both of bas's layouts (``--format kohya``'s
``embeddings/NAME-assetN.safetensors``: SD ``{"emb_params": [1, D]}``, SDXL ``{"clip_l": [1, 768],
"clip_g": [1, 1280]}``; ``--format diffusers``' ``embeddings/assetN.safetensors``) with random rows.

ComfyUI's model detection (``unet_config_from_diffusers_unet``) picks the model's config from the
UNet's diffusers layout, the model (``BaseModel``, ``SDXL``) and the config's CLIP model
(``SD1ClipModel``, ``SD2ClipModel``, ``SDXLClipModel``) are built as ComfyUI builds them, and each
LoRA file is loaded as ComfyUI's LoraLoader node does (``load_torch_file``,
``comfy.sd.load_lora_for_models``).  The check counts the keys ComfyUI logs as not loaded, the
weights it patches, and compares each patched weight's change (ComfyUI's ``calculate_weight`` on a
zero weight) with the layer's ``alpha / rank * up @ down``.  Each embedding is typed in a prompt as
ComfyUI's users type it (``embedding:NAME``), tokenized by the config's tokenizer with the embeddings
folder (``SDXLTokenizer``: ``clip_l`` and ``clip_g``, each reading its own key of the file through
``sd1_clip.load_embed``), and the tokens go through each text encoder's ``process_tokens`` (the
step of ``SDClipModel.forward`` that puts embeddings into the prompt; only the token-embedding table
is made real, on the CPU): the check compares the vector at the embedding's place with the handle's
row for that encoder.  Exit status 1 when any key is left out, any change differs or any embedding
is not where it should be.  ComfyUI's optional media packages (torchvision, av, ...) are replaced
by empty stand-ins: its LoRA and embedding code does not use them.
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

# (title, benchmarks.presets name, prediction, bas's model family)
MODELS = [("SD 1.5", "sd15", "eps", "sd"), ("SD 2.1 base", "sd21", "eps", "sd"), ("SD 2.1 768-v", "sd21", "v", "sd"),
          ("SDXL base 1.0", "sdxl", "eps", "sdxl")]
MEDIA = {"torchvision", "torchaudio", "av", "kornia", "spandrel", "sentencepiece", "aiohttp"}
HANDLES = ("<asset0>", "<asset1>")
EMBEDDING_NAME = "scene"  # --format kohya's --name: its embeddings are scene-asset0, scene-asset1


def bas_family(name: str):
    from bas.plugins.sd import StableDiffusion
    from bas.plugins.sdxl import StableDiffusionXL

    return {"sd": StableDiffusion, "sdxl": StableDiffusionXL}[name]()


def bas_files(preset: str, family_name: str, directory: Path) -> tuple[dict, dict, dict, dict]:
    """``({file: (kind, path, layers)}, {(kind, component, module): (scale, up, down)}, UNet shapes,
    {embeddings folder: {embedding name: {component: row}}})``: the LoRA and embedding files bas writes
    for ``preset``'s layout; the UNet's shapes are for ComfyUI's model detection."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bas.exports.export import a1111_embedding_name, handle_file_stem, write_a1111_embeddings, write_textual_inversions
    from bas.exports.formats import LoraLayer, kohya_targets, standard_module, write_diffusers_lora, write_kohya_lora
    from benchmarks.presets import CLIP_VOCAB_SIZE, PRESETS

    family = bas_family(family_name)
    p = PRESETS[preset]
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**p.unet),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, **p.text))}
        if p.text_2:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, **p.text_2))
    assert set(models) == set(family.lora_targets), (set(models), family.lora_targets)
    g = torch.Generator().manual_seed(0)
    files, changes = {}, {}
    for kind in ("lora-run", "low-rank-difference"):
        layers = []
        for component, model in models.items():
            for name, m in model.named_modules():
                if kind == "lora-run":
                    if not isinstance(m, torch.nn.Linear) or not name.endswith(tuple(family.lora_targets[component])):
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
        write_kohya_lora(layers, directory / f"{kind}.safetensors", {}, family.kohya_prefixes)
        files[f"{kind} (kohya)"] = (kind, directory / f"{kind}.safetensors", len(layers))
    unet_shapes = {k: v.shape for k, v in models["unet"].state_dict().items()}
    rows = {token: {c: torch.randn(m.get_input_embeddings().embedding_dim, generator=g) for c, m in models.items() if c != "unet"}
            for token in HANDLES}
    write_a1111_embeddings(family, rows, directory / "kohya-embeddings", EMBEDDING_NAME)
    write_textual_inversions(family, rows, directory / "diffusers-embeddings")
    embeddings = {directory / "kohya-embeddings": {a1111_embedding_name(t, EMBEDDING_NAME): r for t, r in rows.items()},
                  directory / "diffusers-embeddings": {handle_file_stem(t): r for t, r in rows.items()}}
    return files, changes, unet_shapes, embeddings


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


def check_embeddings(clip_model, tokenizer_class, embeddings: dict, log: _Log) -> int:
    """Type each embedding in a prompt as ComfyUI's users do and put the tokens through each text encoder's
    ``process_tokens``; prints and returns the number of failures."""
    # ComfyUI's name of each encoder's tokens ("l", "h", "g") -> bas's component
    present = [key for key in ("l", "h", "g") if hasattr(clip_model, f"clip_{key}")]
    components = {key: "text_encoder_2" if key == "g" and len(present) > 1 else "text_encoder" for key in present}
    cpu = torch.device("cpu")
    for key in components:
        table = getattr(clip_model, f"clip_{key}").transformer.get_input_embeddings()
        if table.weight.device.type == "meta":  # only the token-embedding table is made real
            table.to_empty(device=cpu)
            torch.nn.init.normal_(table.weight, generator=torch.Generator().manual_seed(1))
    failures = 0
    for folder, names in embeddings.items():
        tokenizer = tokenizer_class(embedding_directory=str(folder))
        for name, rows in names.items():
            log.lines.clear()
            tokens = tokenizer.tokenize_with_weights(f"a photo of embedding:{name} at the beach")
            results = []
            for key, batches in tokens.items():
                component = components[key]
                encoder = getattr(clip_model, f"clip_{key}")
                with torch.no_grad():
                    embeds, _, _, info = encoder.process_tokens([[t for t, _ in batch] for batch in batches], cpu)
                placed = [i["index"] for i in info if i["type"] == "embedding"]
                ok = len(batches) == 1 and len(placed) == 1 and embeds.shape[1] == len(batches[0])
                diff = float((embeds[0, placed[0]] - rows[component].float()).abs().max()) if ok else float("inf")
                results.append(f"clip_{key} {rows[component].numel()}-d row at token {placed[0] if placed else '-'} "
                               f"|difference| {diff:.1e}")
                failures += not (ok and diff == 0)
            missing = set(components.values()) - {components[k] for k in tokens}
            failures += bool(missing) + bool(log.lines)
            print(f"  embedding:{name:14s} ({folder.name}): " + "; ".join(results)
                  + (f"; no tokens for {', '.join(sorted(missing))}" if missing else "") + (f"; {log.lines[0]}" if log.lines else ""))
    return failures


def main(comfyui: Path, deps: Path | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        for _, preset, _, family in MODELS:  # bas, diffusers and transformers first: they must not see the stand-ins
            if preset not in built:
                (Path(tmp) / preset).mkdir()
                built[preset] = bas_files(preset, family, Path(tmp) / preset)
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
        cpu, meta = torch.device("cpu"), torch.device("meta")
        failures = 0
        for title, preset, prediction, _ in MODELS:
            files, changes, unet_shapes, embeddings = built[preset]
            unet_config = comfy.model_detection.unet_config_from_diffusers_unet({k: torch.empty(s, device="meta") for k, s in unet_shapes.items()})
            model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
            if prediction == "v":  # ComfyUI reads SD 2.x's v-prediction from the weights' values, which the meta device has not
                model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION, device=meta)
            else:
                model = model_config.get_model({}, device=meta)
            target = model_config.clip_target()
            clip_model = target.clip(device=meta)
            clip = comfy.sd.CLIP(no_init=True)
            clip.patcher = comfy.model_patcher.ModelPatcher(clip_model, load_device=cpu, offload_device=cpu)
            clip.cond_stage_model, clip.tokenizer, clip.layer_idx, clip.tokenizer_options = clip_model, None, None, {}
            clip.use_clip_schedule, clip.apply_hooks_to_conds = False, None
            patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
            # ComfyUI's names of the weights bas's modules are: its diffusers-to-ldm UNet table, the CLIP models' prefixes
            unet_names = {k: "diffusion_model." + v for k, v in comfy.utils.unet_to_diffusers(model_config.unet_config).items()}
            clip_prefixes = sorted({k.split(".transformer.")[0] for k in clip_model.state_dict() if ".transformer.text_model." in k})
            encoder_prefix = {"text_encoder": next(p for p in clip_prefixes if p != "clip_g") if clip_prefixes != ["clip_g"] else "clip_g",
                              "text_encoder_2": "clip_g"}
            print(f"{title}: ComfyUI detects {type(model_config).__name__}, {type(model).__name__} {model.model_type.name}, "
                  f"{type(clip_model).__name__} ({', '.join(clip_prefixes)})")
            for name, (kind, path, n_layers) in files.items():
                log.lines.clear()
                lora = comfy.utils.load_torch_file(str(path), safe_load=True)
                new_model, new_clip = comfy.sd.load_lora_for_models(patcher, clip, lora, 1.0, 1.0)
                patched = {**{k: (new_model, v) for k, v in new_model.patches.items()},
                           **{k: (new_clip.patcher, v) for k, v in new_clip.patcher.patches.items()}}
                worst = 0.0
                per_component: dict[str, int] = {}
                for (k, component, module), (scale, up, down) in changes.items():
                    if k != kind:
                        continue
                    change = (scale * up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
                    key = unet_names[module + ".weight"] if component == "unet" else f"{encoder_prefix[component]}.transformer.{module}.weight"
                    if key not in patched:
                        worst = float("inf")
                        continue
                    per_component[component] = per_component.get(component, 0) + 1
                    got = comfy.lora.calculate_weight(patched[key][1], torch.zeros(change.shape), key)
                    worst = max(worst, float((got - change).abs().max()))
                skipped = [line for line in log.lines if "not loaded" in line.lower() or "mismatch" in line.lower()]
                ok = not skipped and len(patched) == n_layers and worst < 1e-5
                failures += not ok
                names = {"unet": "UNet", "text_encoder": encoder_prefix["text_encoder"], "text_encoder_2": "clip_g"}
                print(f"  {name:32s} {len(lora):5d} keys, {len(skipped)} not loaded; {len(patched)} of {n_layers} layers patched "
                      f"({', '.join(f'{names[c]} {n}' for c, n in per_component.items())}); max |change - alpha/rank up@down| {worst:.1e}"
                      + ("" if ok else "  FAIL"))
                for line in skipped[:3]:
                    print("    " + line)
            log.lines.clear()
            failures += check_embeddings(clip_model, target.tokenizer, embeddings, log)
        return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
