"""Exports of a finished run for the places people generate images: diffusers, AUTOMATIC1111, ComfyUI.

Formats (``bas export OUT --format FORMAT --out DIR``):

- ``diffusers``: one textual-inversion file per handle, keyed by its token
  (``{"<asset0>": tensor[D]}``, so ``pipe.load_textual_inversion(file)`` needs no other
  argument), and the weights as the run saved them: ``lora/`` for ``pipe.load_lora_weights``, or
  the whole ``pipeline/`` of a full fine-tune.
- ``kohya``: one LoRA safetensors with kohya-style keys (``lora_unet_*``, ``lora_te_*`` with
  ``.lora_down``/``.lora_up``/``.alpha``) and kohya's metadata, as AUTOMATIC1111 and ComfyUI load
  it, and one embedding per handle as they read it (``{"emb_params": tensor[1, D]}``).  From a
  full fine-tune the LoRA is its low-rank difference to the base model.
- ``lora-from-full``: a full fine-tune as a diffusers LoRA by low-rank difference (SVD of the
  change of every linear layer and 1x1 convolution in the UNet's transformer blocks and the text
  encoder's layers, the layers kohya's LoRA covers), so a scene costs MB instead of a 5 GB pipeline.

The file layouts themselves (key names, alphas, headers) are in :mod:`bas.exports.formats`.

Every export holds a model card, ``README.md``: handles, base model, prompts that work, which
files go together, and a preview.  ``bas run`` itself writes the cheap parts: the
textual-inversion files (``embeddings/``) and the model card of the run folder.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import torch

from bas.core.version import __version__
from bas.core import io
from bas.core.compat import LORA_WEIGHT_NAME
from bas.core.errors import BasError
from bas.core.family import ModelFamily, python_str
from bas.exports.formats import LoraLayer, kohya_targets, read_diffusers_lora, write_diffusers_lora, write_kohya_lora
from bas.generation.generate import all_handles_prompt, read_run, sampling_code, slug
from bas.core.handles import check_handle_names, split_handles
from bas.core.runs import read_weights, run_family, run_model

FORMATS = ("diffusers", "kohya", "lora-from-full")
EMBEDDINGS_DIR = "embeddings"
LORA_FILE = "lora/pytorch_lora_weights.safetensors"
PIPELINE_DIR = "pipeline/"
PREVIEW = "preview.png"
DEFAULT_RANK = 32
EXAMPLE_PLACES = ("at the beach", "in the snow", "on a wooden table")


@torch.no_grad()
def low_rank_difference(base: torch.nn.Module, tuned: torch.nn.Module, component: str, rank: int,
                        device: torch.device | str = "cpu") -> list[LoraLayer]:
    """A LoRA whose ``up @ down`` is the best rank-``rank`` approximation (SVD) of each layer's weight
    change from ``base`` to ``tuned``, over the layers kohya's LoRA covers (1x1 convolutions as
    4-D factors).  Unchanged layers are left out; a layer smaller than ``rank`` gets its full rank."""
    base_modules = dict(base.named_modules())
    layers = []
    for name, module in tuned.named_modules():
        if not kohya_targets(component, name, module):
            continue
        weight = module.weight.to(device, torch.float32)
        delta = (weight - base_modules[name].weight.to(device, torch.float32)).reshape(weight.shape[0], -1)
        if not delta.any():
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        down, up = root[:, None] * vh[:r], u[:, :r] * root
        if weight.dim() == 4:  # a 1x1 convolution
            down, up = down.reshape(r, *weight.shape[1:]), up.reshape(weight.shape[0], r, 1, 1)
        layers.append(LoraLayer(component, name, down.cpu().contiguous(), up.cpu().contiguous(), float(r)))
    return layers


def lora_from_full(out: Path, info: dict, rank: int, device: str = "auto", family: ModelFamily | None = None) -> list[LoraLayer]:
    """The low-rank difference between a full fine-tune's ``pipeline/`` and its base model, over the
    denoiser and every text encoder."""
    from bas.core.model import load_components, resolve_device

    if rank < 1:
        raise BasError(f"--rank must be at least 1, not {rank}.")
    dev = resolve_device(device)
    family = family or run_family(info, out=out)
    with run_model(out):  # export takes no --model: a base model that cannot be loaded is named as the run's
        base = load_components(info["model"], family).trainable_modules()
    tuned = load_components(str(out / "pipeline"), family).trainable_modules()
    layers = [layer for name in tuned for layer in low_rank_difference(base[name], tuned[name], name, rank, dev)]
    if not layers:
        raise BasError(f"{out / 'pipeline'} has the same weights as {info['model']}; there is no difference to export.")
    return layers


def kohya_metadata(info: dict, name: str, handles: dict, family: ModelFamily) -> dict[str, str]:
    """The header kohya's sd-scripts write (``ss_*``) and Stability's model spec (``modelspec.*``), as
    AUTOMATIC1111 and ComfyUI read them; the handles' embedding names are the trigger words.  The
    base model's version and architecture are the family's (``ModelFamily.kohya_base``)."""
    base = family.kohya_base(info)
    v_prediction = info.get("prediction_type") == "v_prediction"
    words = [a1111_embedding_name(token, name) for token in handles]
    resolution = info.get("resolution") or base["resolution"]
    return {
        "ss_output_name": name, "ss_sd_model_name": str(info["model"]), "ss_v2": str(base["v2"]),
        "ss_base_model_version": base["version"], "ss_v_parameterization": str(v_prediction),
        "ss_resolution": f"({resolution}, {resolution})", "ss_num_train_images": "1",
        "ss_tag_frequency": json.dumps({name: {word: 1 for word in words}}),  # one image whose caption has every handle
        "ss_training_comment": f"bas (Break-A-Scene): load the embeddings {', '.join(words)} with this LoRA",
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": base["architecture"],
        "modelspec.implementation": "diffusers", "modelspec.implementation_version": f"bas/{__version__}",
        "modelspec.title": name, "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": base.get("prediction_type") or ("v" if v_prediction else "epsilon"),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"), "modelspec.trigger_phrase": ", ".join(words),
        "modelspec.description": f"{len(words)} concepts extracted from one image with bas (Break-A-Scene), base model {info['model']}.",
        "modelspec.usage_hint": f"Load the embeddings too and prompt such as 'a photo of {words[0]} at the beach'.",
    }


# -- embeddings ----------------------------------------------------------------------------------
def handle_file_stem(token: str) -> str:
    """``<asset0>`` -> ``asset0`` (brackets are not allowed in Windows file names); any other
    name, which a handles file could hold, is refused before it becomes a path."""
    check_handle_names([token])
    return token.strip("<>")


def handle_rows(family: ModelFamily, handles: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{token: {encoder name: row}}`` from a handles file, in handle order."""
    by_encoder = split_handles(handles, [name for name, _ in family.text_encoder_names])
    tokens = list(next(iter(by_encoder.values())))
    return {token: {name: rows[token] for name, rows in by_encoder.items()} for token in tokens}


def write_textual_inversions(family: ModelFamily, handles: dict[str, dict[str, torch.Tensor]], directory: Path) -> list[Path]:
    """diffusers' format, one file per handle, named after it: ``{token: tensor[D]}`` for a family
    with one text encoder (``pipe.load_textual_inversion(file)`` needs no other argument)."""
    paths = []
    for token, rows in handles.items():
        path = Path(directory) / f"{handle_file_stem(token)}.safetensors"
        io.write_safetensors(path, family.textual_inversion(token, rows))
        paths.append(path)
    return paths


def a1111_embedding_name(token: str, name: str) -> str:
    """What to type in AUTOMATIC1111/ComfyUI: the file name, prefixed so scenes do not collide."""
    return f"{name}-{handle_file_stem(token)}"


def write_a1111_embeddings(family: ModelFamily, handles: dict[str, dict[str, torch.Tensor]], directory: Path, name: str) -> list[Path]:
    """AUTOMATIC1111/ComfyUI's format (``{"emb_params": tensor[1, D]}`` for one text encoder), the file name is the word."""
    paths = []
    for token, rows in handles.items():
        path = Path(directory) / f"{a1111_embedding_name(token, name)}.safetensors"
        io.write_safetensors(path, family.webui_embedding(rows))
        paths.append(path)
    return paths


# -- the model card ------------------------------------------------------------------------------
def example_prompts(info: dict) -> list[str]:
    """Prompts in the style the handles were trained on: each alone, then all of them together."""
    handles = info["handles"]
    background = info.get("background")
    concepts = [h for h in handles if h != background]
    prompts = [f"a photo of {h} {EXAMPLE_PLACES[i % len(EXAMPLE_PLACES)]}" for i, h in enumerate(concepts)]
    if len(handles) > 1:
        prompts.append(all_handles_prompt(handles))
    if background:
        prompts.append(f"a photo of a dog and {background}")
    return prompts


def model_card(info: dict, *, title: str, files: list[tuple[str, str]], usage: str, preview: str | None,
               prompt_map=lambda p: p) -> str:
    handles = info["handles"]
    masks = info.get("masks") or [""] * len(handles)
    inits = info.get("init_tokens") or []
    lines = [f"# {title}", ""]
    lines += [f"![samples of the handles]({preview})", ""] if preview else []
    weights = {"lora": "LoRA on the UNet and text encoder", "full": "a full fine-tune of the UNet and text encoder", None: "none (handles only)"}
    lines += [
        f"{len(handles)} concepts extracted from one image with [bas](https://arxiv.org/abs/2305.16311) (Break-A-Scene).", "",
        f"- Base model: `{info['model']}`",
        f"- Phase 2 weights: {weights.get(info.get('weights'), info.get('weights'))}",
        f"- Resolution: {info.get('resolution')} px", "",
        "| handle | concept (mask) | started from |", "|---|---|---|",
    ]
    for i, token in enumerate(handles):
        init = inits[i] if i < len(inits) else ("background" if token == info.get("background") else "object")
        lines.append(f"| `{prompt_map(token)}` | {masks[i] if i < len(masks) else ''} | {init} |")
    if info.get("background"):
        lines += ["", f"`{prompt_map(info['background'])}` is the background: everything outside the masks."]
    lines += ["", "## Prompts that work", ""] + [f"- `{prompt_map(p)}`" for p in example_prompts(info)]
    lines += ["", "## Files (these go together)", "", "| file | what |", "|---|---|"] + [f"| `{f}` | {w} |" for f, w in files]
    if info.get("weights"):
        lines += ["", "The handles were trained together with the weights in phase 2: load both; either alone gives weaker likeness."]
    lines += ["", usage.strip(), ""]
    return "\n".join(lines)


def diffusers_usage(info: dict, root: str, lora: bool, pipeline: bool, family: ModelFamily) -> str:
    files = [(t, f"{root}{EMBEDDINGS_DIR}/{handle_file_stem(t)}.safetensors") for t in info["handles"]]
    model = f"{root}pipeline" if pipeline else info["model"]
    cls = family.pipeline_class
    scheduler_classes, sampling = sampling_code(family, info, example_prompts(info)[0])
    code = [
        "import torch",
        f"from diffusers import {', '.join([cls, *scheduler_classes])}",
        "",
        "# bf16: bas generate's precision on GPUs that have it (float16 on older ones, float32 on a CPU)",
        f'pipe = {cls}.from_pretrained({python_str(model)}, torch_dtype=torch.bfloat16).to("cuda")',
    ]
    if lora:
        code.append(f'pipe.load_lora_weights({python_str(root + "lora")}, weight_name={python_str(LORA_WEIGHT_NAME)})')
    if not pipeline:  # a full fine-tune's pipeline already knows its handles
        code += family.textual_inversion_code(files)
    code += sampling
    return ("## Use with diffusers\n\nThe sampler, guidance, steps, size and seed are `bas generate`'s defaults, so this writes the image "
            "`bas generate` writes for seed 0.\n\n```python\n" + "\n".join(code) + "\n```")


def kohya_usage(info: dict, name: str, lora: bool, family: ModelFamily) -> str:
    word = a1111_embedding_name(info["handles"][0], name)
    place = EXAMPLE_PLACES[0]
    lora_tag = f" <lora:{name}:1>" if lora else ""
    label = family.kohya_base(info)["label"]
    version = f" ({label})" if label else ""
    return f"""## Use in AUTOMATIC1111 or ComfyUI

Base model: `{info['model']}`{version}.

- AUTOMATIC1111: copy {'`' + name + '.safetensors` into `models/Lora/` and ' if lora else ''}`{EMBEDDINGS_DIR}/*.safetensors` into `embeddings/`;
  prompt: `a photo of {word} {place}{lora_tag}`.
- ComfyUI: copy {'`' + name + '.safetensors` into `models/loras/` (a LoraLoader node, strength 1) and ' if lora else ''}`{EMBEDDINGS_DIR}/*.safetensors` into
  `models/embeddings/`; prompt: `a photo of embedding:{word} {place}`.

Each handle `<assetN>` is typed as the embedding's file name, `{name}-assetN`."""


PREVIEW_GRID = re.compile(r"report/validation-phase\d+-step\d+\.png")


def find_preview(out: Path, info: dict | None = None) -> Path | None:
    """The newest validation grid of the run's report, if it has one: among the files its run.json
    records (``info``, checked by :func:`bas.core.runs.read_run`), or for a run without that record
    (bas before 0.2, or the staging folder while the run is written), those in the folder, each of
    which must be a file of the folder (a link is refused)."""
    out = Path(out)
    if info is not None and isinstance(info.get("checksums"), dict):
        names = [name for name in info["checksums"] if PREVIEW_GRID.fullmatch(name)]
    else:
        names = [f"report/{p.name}" for p in (out / "report").glob("validation-phase*-step*.png")]
    if not names:
        return None
    newest = io.inside(out, sorted(names)[-1], f"{out}'s report")
    if newest.is_symlink():
        raise BasError(f"{newest} is a link, not a validation grid its run wrote; restore the folder or re-run `bas run`.")
    return newest


def run_files(info: dict) -> tuple[bool, bool]:
    """(has a diffusers LoRA, has a full pipeline)."""
    files = info.get("files", [])
    return LORA_FILE in files, PIPELINE_DIR in files


def write_run_exports(out: Path, info: dict, shown_as: Path | None = None, family: ModelFamily | None = None) -> list[str]:
    """What ``bas run`` writes besides the weights: textual-inversion files and the model card, in the
    layout of the run's ``family`` (by default the one run.json names).

    ``shown_as``: the folder's name in the card when ``out`` is where the run is written for now
    (its staging folder)."""
    out = Path(out)
    shown = Path(shown_as or out)
    family = family or run_family(info)
    handles = handle_rows(family, read_weights(out / "handles.safetensors"))
    with io.atomic_path(out / EMBEDDINGS_DIR, directory=True) as tmp:  # replaces an overwritten run's files as a whole
        names = [p.name for p in write_textual_inversions(family, handles, tmp)]
    written = [f"{EMBEDDINGS_DIR}/{name}" for name in names]
    lora, pipeline = run_files(info)
    layout = "`{token: tensor[D]}`" if len(family.text_encoder_names) == 1 else "`{token: tensor[D]}`, other text encoders' rows as `{encoder}.{token}`"
    files = [("handles.safetensors", f"all handles in one file, {layout}")]
    files += [(f, f"handle `{token}`, textual inversion for diffusers") for token, f in zip(handles, written)]
    if lora:
        files.append((LORA_FILE, "the LoRA, for `pipe.load_lora_weights`"))
    if pipeline:
        files.append((PIPELINE_DIR, "the whole fine-tuned pipeline, handles included"))
    preview = find_preview(out)
    card = model_card(info, title=f"{shown.name}: {len(handles)} concepts for {info['model']}", files=files,
                      usage=diffusers_usage(info, f"{shown}/", lora, pipeline, family),
                      preview=preview.relative_to(out).as_posix() if preview else None)
    with io.atomic_path(out / "README.md") as tmp:
        tmp.write_text(card, encoding="utf-8")
    return written + ["README.md"]


# -- bas export ----------------------------------------------------------------------------------
EXPORT_NAMES = {"README.md", PREVIEW, EMBEDDINGS_DIR, "lora", "pipeline"}  # and NAME.safetensors (kohya)


def check_destination(out: Path, dest: Path, overwrite: bool) -> None:
    """The export replaces ``dest`` as a whole: never a folder that holds anything but an export."""
    from bas.core.runfolder import check_target

    check_target(dest, kind="export")
    out_r, dest_r = Path(out).resolve(), Path(dest).resolve()
    if dest_r == out_r or dest_r in out_r.parents or out_r in dest_r.parents:
        raise BasError(f"--out {dest} overlaps the run folder {out}; export to a folder outside it.")
    if dest_r.exists() and (not dest_r.is_dir() or any(dest_r.iterdir())) and not overwrite:
        raise BasError(f"{dest} already exists and is not empty; pass --overwrite to replace it or choose another --out.")
    foreign = sorted(p.name for p in dest_r.iterdir() if p.name not in EXPORT_NAMES and p.suffix != ".safetensors") if dest_r.is_dir() else []
    if foreign:
        raise BasError(f"--out {dest} holds {foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which no export writes, "
                       "and --overwrite replaces the whole folder; choose a new or empty folder.")


PREVIEW_STEPS = 25  # a generated preview's steps: fewer than bas generate's 50, never more than the run's own default


def preview_steps_for(info: dict) -> int:
    """The steps of a generated preview of the run ``info``: :data:`PREVIEW_STEPS`, or the steps ``bas
    generate`` takes for the run where fewer (FLUX.1-schnell: 4), from the same defaults."""
    from bas.generation.generate import run_sampling_defaults

    return min(PREVIEW_STEPS, run_sampling_defaults(run_family(info), info, None, None, None)[2])


def render_preview(out: Path, info: dict, path: Path, steps: int | None, device: str, precision: str) -> None:
    """Generate a small grid (each handle alone, then all) when the run has no report to take one from;
    ``steps`` None: :func:`preview_steps_for` the run."""
    from PIL import Image

    from bas.generation.generate import generate_images, image_grid

    steps = preview_steps_for(info) if steps is None else steps
    prompts = example_prompts(info)
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_images(out, prompts, num_images=1, steps=steps, grid=False, out_dir=Path(tmp), device=device, precision=precision)
        io.save_image(path, image_grid([[Image.open(p).convert("RGB") for p in paths]]))


def check_kohya_names(layers: list[LoraLayer], family: ModelFamily) -> None:
    """Refuse, before anything is written, layers that the family's kohya names cannot hold (an SDXL
    LoRA's second text encoder in SD 1.x's ``lora_te_`` scheme would load into the wrong encoder)."""
    foreign = sorted({layer.component for layer in layers} - set(family.kohya_prefixes))
    if foreign:
        raise BasError(f"The LoRA has {', '.join(foreign)} layers, which the {family.name} family's kohya names "
                       f"({', '.join(family.kohya_prefixes.values())}) have no place for; run.json names the wrong family, "
                       "so export the run with the family it was trained with.")


def export_run(out: Path, fmt: str, dest: Path, *, rank: int = DEFAULT_RANK, name: str | None = None, preview: bool = True,
               preview_steps: int | None = None, overwrite: bool = False, device: str = "auto", precision: str = "auto") -> list[Path]:
    """Write the export ``fmt`` of the finished run ``out`` into the folder ``dest``; returns the files written."""
    out, dest = Path(out), Path(dest)
    if fmt not in FORMATS:
        raise BasError(f"Unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}.")
    info = read_run(out)
    check_destination(out, dest, overwrite)
    name = slug(name or out.name, 60)
    has_lora, has_pipeline = run_files(info)
    family = run_family(info, out=out)
    if fmt not in family.export_formats:
        raise BasError(f"Runs of the {family.name} family export as {', '.join(family.export_formats)}; --format {fmt} is not one of them.")
    if fmt == "lora-from-full" and not has_pipeline:
        raise BasError(f"{out} is not a full fine-tune (it has no pipeline/); export it with --format diffusers or kohya.")
    handles = handle_rows(family, read_weights(out / "handles.safetensors"))
    info = dict(info, handle_dim=next(iter(next(iter(handles.values())).values())).numel())
    layers = None
    if fmt == "lora-from-full" or (fmt == "kohya" and has_pipeline):
        layers = lora_from_full(out, info, rank, device, family)
    elif fmt == "kohya" and has_lora:
        layers = read_diffusers_lora(out / LORA_FILE)
    network_dim = max(layer.rank for layer in layers) if layers else None  # the run's rank, before a family fuses layers
    if fmt == "kohya" and layers:
        check_kohya_names(layers, family)
        layers = family.kohya_layers(layers)

    with io.atomic_path(dest, directory=True) as tmp:
        files: list[tuple[str, str]] = []
        if fmt == "kohya":
            if layers:
                write_kohya_lora(layers, tmp / f"{name}.safetensors", kohya_metadata(info, name, handles, family), family.kohya_prefixes,
                                 network_dim)
                how = "by low-rank difference of the full fine-tune, rank " + str(rank) if has_pipeline else "trained in phase 2"
                files.append((f"{name}.safetensors", f"the LoRA ({how}), kohya keys"))
            for p in write_a1111_embeddings(family, handles, tmp / EMBEDDINGS_DIR, name):
                files.append((f"{EMBEDDINGS_DIR}/{p.name}", f"handle `<{p.stem.rsplit('-', 1)[1]}>` as the embedding `{p.stem}`"))
            usage = kohya_usage(info, name, bool(layers), family)
            prompt_map = lambda p: re.sub(r"<(asset\d+)>", lambda m: f"{name}-{m.group(1)}", p)  # noqa: E731
        else:
            for p in write_textual_inversions(family, handles, tmp / EMBEDDINGS_DIR):
                files.append((f"{EMBEDDINGS_DIR}/{p.name}", f"handle `<{p.stem}>`, textual inversion for diffusers (see below)"))
            if fmt == "lora-from-full":
                write_diffusers_lora(layers, tmp / "lora")
                files.append((LORA_FILE, f"the full fine-tune as a LoRA by low-rank difference (rank {rank}), for `pipe.load_lora_weights`"))
            elif has_lora:  # rewritten, so that a run of an earlier bas version exports in today's layout
                write_diffusers_lora(read_diffusers_lora(out / LORA_FILE), tmp / "lora")
                files.append((LORA_FILE, "the LoRA trained in phase 2, for `pipe.load_lora_weights`"))
            elif has_pipeline:
                io.copy_tree(out / "pipeline", tmp / "pipeline", "The run's pipeline")
                files.append((PIPELINE_DIR, "the whole fine-tuned pipeline, handles included (`--format lora-from-full` makes a LoRA of it)"))
            lora = fmt == "lora-from-full" or has_lora
            usage = diffusers_usage(info, f"{dest}/", lora, fmt == "diffusers" and has_pipeline, family)
            prompt_map = lambda p: p  # noqa: E731
        found = find_preview(out, info) if preview else None
        if found:
            io.copy_file(found, tmp / PREVIEW, "The run's validation grid")
        elif preview:
            render_preview(out, info, tmp / PREVIEW, preview_steps, device, precision)
        card = model_card(info, title=f"{name}: {len(handles)} concepts for {info['model']}", files=files, usage=usage,
                          preview=PREVIEW if (tmp / PREVIEW).exists() else None, prompt_map=prompt_map)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        written = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
    return [dest / p for p in written]
