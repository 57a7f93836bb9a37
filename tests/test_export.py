"""Exports load where people generate images: plain diffusers, and kohya-style files for A1111/ComfyUI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from bas.cli import cli
from bas.exports.formats import kohya_model_hash, kohya_targets, standard_module

import comfyui_keys
from conftest import as_an_earlier_version_wrote, check_card_writes_the_generated_image, exported_card, quick_run_args

OUTPUTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"  # the docs page on run folders and exports


def plain_pipeline(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model, scene):
    out = tmp_path_factory.mktemp("runs") / "full"
    # a high learning rate, so that the fine-tune moves the weights measurably in 2 steps
    args = quick_run_args(scene, tiny_model, out, "--plugin", "full", "--phase2-lr", "1e-3", "--phase1-steps", 1, "--phase2-steps", 2)
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_run_writes_textual_inversion_files_and_a_model_card(rich_run, tiny_model):
    handles = load_file(str(rich_run / "handles.safetensors"))
    assert list(handles) == ["<asset0>", "<asset1>", "<asset2>"]
    for token, row in handles.items():
        ti = load_file(str(rich_run / "embeddings" / f"{token.strip('<>')}.safetensors"))
        assert list(ti) == [token] and torch.equal(ti[token], row)
    card = (rich_run / "README.md").read_text()
    preview = re.search(r"!\[[^\]]*\]\(([^)]+)\)", card).group(1)
    assert (rich_run / preview).is_file() and preview.startswith("report/validation-phase2")
    assert str(tiny_model) in card and "`<asset2>` is the background" in card
    assert "a photo of <asset0> at the beach" in card and "lora/pytorch_lora_weights.safetensors" in card


def test_docs_plain_diffusers_lines_run_without_bas(rich_run, tiny_model, tmp_path):
    """The docs' snippet (docs/outputs.md), with the model and run folder swapped for the tiny ones, runs as written."""
    text = OUTPUTS_PAGE.read_text()
    code = re.search(r"Using a run in plain diffusers.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) == 5 and "import bas" not in code and "from bas" not in code
    code = (code.replace("stabilityai/stable-diffusion-2-1-base", str(tiny_model)).replace("runs/toys", str(rich_run))
            .replace('"cuda"', '"cpu"').replace('"beach.png"', repr(str(tmp_path / "beach.png")))
            .replace('at the beach")', 'at the beach", num_inference_steps=2)'))
    assert "num_inference_steps=2" in code
    exec(compile(code, "docs/outputs.md", "exec"), {})
    assert (tmp_path / "beach.png").is_file()


def test_diffusers_export_loads_into_a_plain_pipeline_and_changes_it(rich_run, tiny_model, invoke, tmp_path):
    dest = tmp_path / "export"
    result = invoke("export", rich_run, "--format", "diffusers", "--out", dest)
    assert result.exit_code == 0, result.output
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == {
        "README.md", "preview.png", "lora/pytorch_lora_weights.safetensors",
        "embeddings/asset0.safetensors", "embeddings/asset1.safetensors", "embeddings/asset2.safetensors",
    }
    pipe = plain_pipeline(tiny_model)
    lora = load_file(str(dest / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora.keys() == load_file(str(rich_run / "lora" / "pytorch_lora_weights.safetensors")).keys()
    changes, left_out = comfyui_keys.load_lora(lora, comfyui_keys.key_map(pipe.unet, pipe.text_encoder))
    assert left_out == [] and len(changes) == len(lora) // 2  # ComfyUI maps every layer
    before = sample(pipe, "a photo of a ball")
    pipe.load_lora_weights(str(dest / "lora"))
    with_lora = sample(pipe, "a photo of a ball")
    assert not np.allclose(before, with_lora)
    handle_prompt = "a photo of <asset0> and <asset2>"
    without_handles = sample(pipe, handle_prompt)  # the tokenizer splits "<asset0>" into characters
    for path in sorted((dest / "embeddings").glob("*.safetensors")):
        pipe.load_textual_inversion(str(path))  # no token argument: the file is keyed by its handle
    handles = load_file(str(rich_run / "handles.safetensors"))
    emb = pipe.text_encoder.get_input_embeddings().weight
    for token, row in handles.items():
        assert torch.equal(emb[pipe.tokenizer.convert_tokens_to_ids(token)], row)
    assert not np.allclose(without_handles, sample(pipe, handle_prompt))
    card = (dest / "README.md").read_text()
    assert "![samples of the handles](preview.png)" in card and "load both" in card


@pytest.mark.old_stack  # also run on the oldest supported stack (CI)
@pytest.mark.parametrize("where", ["run", "export"])
def test_model_card_code_writes_the_image_bas_generate_writes(rich_run, invoke, tmp_path, where):
    """The card's snippet samples with bas generate's defaults for SD (DDIM, guidance 7.5, the run's size, seed 0)."""
    card = rich_run / "README.md" if where == "run" else exported_card(rich_run, invoke, tmp_path)
    assert "DDIMScheduler" in card.read_text() and "guidance_scale=7.5" in card.read_text()
    check_card_writes_the_generated_image(card, rich_run, invoke, tmp_path)


def test_kohya_export_has_kohya_keys_and_round_trips_to_diffusers(rich_run, tiny_model, invoke, tmp_path):
    dest = tmp_path / "kohya"
    result = invoke("export", rich_run, "--format", "kohya", "--out", dest, "--name", "toys")
    assert result.exit_code == 0, result.output
    lora = load_file(str(dest / "toys.safetensors"))
    key = re.compile(r"(lora_unet|lora_te)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")
    assert all(key.fullmatch(k) for k in lora), [k for k in lora if not key.fullmatch(k)][:3]

    pipe = plain_pipeline(tiny_model)
    expected = {}  # kohya name -> (out, in) of the layer it adapts
    for prefix, model, targets in (("lora_unet_", pipe.unet, ("to_q", "to_k", "to_v", "to_out.0")), ("lora_te_text_model_", pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"))):
        for name, module in model.named_modules():
            if name.endswith(targets):
                expected[prefix + name.replace(".", "_")] = tuple(module.weight.shape)
    assert {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in lora} == set(expected)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in lora)
    for name, (out_features, in_features) in expected.items():
        assert lora[f"{name}.lora_down.weight"].shape == (8, in_features)
        assert lora[f"{name}.lora_up.weight"].shape == (out_features, 8)
        assert lora[f"{name}.alpha"].shape == () and float(lora[f"{name}.alpha"]) == 8.0
    with safe_open(str(dest / "toys.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"  # true for every layer, checked above
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_tag_frequency"]) == {"toys": {"toys-asset0": 1, "toys-asset1": 1, "toys-asset2": 1}}
    assert meta["modelspec.title"] == "toys" and meta["modelspec.resolution"] == "128x128"
    assert meta["sshs_model_hash"] == kohya_model_hash(lora, meta) and len(meta["sshs_model_hash"]) == 64

    # back to diffusers: diffusers' own kohya converter gives exactly the LoRA bas saved
    original = plain_pipeline(tiny_model)
    original.load_lora_weights(str(rich_run / "lora"))
    pipe.load_lora_weights(str(dest / "toys.safetensors"))
    for component in ("unet", "text_encoder"):
        a = {n: p for n, p in getattr(original, component).named_parameters() if "lora_" in n}
        b = {n: p for n, p in getattr(pipe, component).named_parameters() if "lora_" in n}
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[n], b[n]) for n in a)
    np.testing.assert_allclose(sample(original, "a photo of a ball"), sample(pipe, "a photo of a ball"), atol=1e-6)

    handles = load_file(str(rich_run / "handles.safetensors"))
    for token, row in handles.items():
        emb = load_file(str(dest / "embeddings" / f"toys-{token.strip('<>')}.safetensors"))
        assert list(emb) == ["emb_params"] and emb["emb_params"].shape == (1, row.numel())
        assert torch.equal(emb["emb_params"][0], row)
    pipe.load_textual_inversion(str(dest / "embeddings" / "toys-asset0.safetensors"), token="<asset0>")
    card = (dest / "README.md").read_text()
    assert "a photo of toys-asset0 at the beach <lora:toys:1>" in card and "embedding:toys-asset0" in card
    assert "`toys-asset2` is the background" in card and "<asset0>" not in card.split("## Prompts")[1].split("## Files")[0]


def test_lora_from_full_is_the_low_rank_difference_of_the_fine_tune(full_run, tiny_model, invoke, tmp_path):
    exact, small = tmp_path / "exact", tmp_path / "small"
    for dest, rank in ((exact, 1000), (small, 1)):  # 1000: above every layer's size, so the SVD is lossless
        result = invoke("export", full_run, "--format", "lora-from-full", "--out", dest, "--rank", rank, "--no-preview")
        assert result.exit_code == 0, result.output
    assert not (exact / "preview.png").exists()
    tuned = plain_pipeline(full_run / "pipeline")

    def target_layers(pipe):
        return {(c, n): m.weight for c in ("unet", "text_encoder") for n, m in getattr(pipe, c).named_modules()
                if kohya_targets(c, n, m)}

    goal = target_layers(tuned)
    base = target_layers(plain_pipeline(tiny_model))
    assert len(goal) > 100 and all(not torch.equal(base[k], w) for k, w in goal.items())  # every layer trained
    errors = {}
    for dest in (exact, small):
        pipe = plain_pipeline(tiny_model)
        pipe.load_lora_weights(str(dest / "lora"))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter wrappers
        fused = target_layers(pipe)
        errors[dest.name] = max(float((fused[k] - w).abs().max()) for k, w in goal.items())
    assert errors["exact"] < 1e-5
    assert errors["small"] > 1e-4  # rank 1 cannot hold a 2-step fine-tune of every layer
    ranks = {v.shape[0] for k, v in load_file(str(small / "lora" / "pytorch_lora_weights.safetensors")).items() if k.endswith(("lora_A.weight", "down.weight"))}
    assert ranks == {1}
    base_pipe = plain_pipeline(tiny_model)  # ComfyUI maps every key and applies the whole difference
    changes, left_out = comfyui_keys.load_lora(load_file(str(exact / "lora" / "pytorch_lora_weights.safetensors")),
                                               comfyui_keys.key_map(base_pipe.unet, base_pipe.text_encoder))
    assert left_out == [] and changes.keys() == {(c, standard_module(c, n)) for c, n in goal}
    assert max(float((changes[(c, standard_module(c, n))] - (w - base[(c, n)])).abs().max()) for (c, n), w in goal.items()) < 1e-5
    assert "low-rank difference (rank 1)" in (small / "README.md").read_text()

    kohya = tmp_path / "kohya"
    result = invoke("export", full_run, "--format", "kohya", "--out", kohya, "--rank", 2, "--no-preview")
    assert result.exit_code == 0, result.output
    lora = load_file(str(kohya / "full.safetensors"))
    assert {v.shape[0] for k, v in lora.items() if k.endswith("lora_down.weight")} == {2}
    assert any(k.startswith("lora_unet_") and "_ff_net_" in k for k in lora)


def test_a_run_of_an_earlier_version_exports_in_todays_layout(rich_run, invoke, tmp_path):
    """A run folder as an earlier bas version wrote it (a LoRA with the peft names, which ComfyUI
    leaves out of the UNet's attention, and a run.json without the files' checksums) exports the
    same files as the run written today."""
    old_run = tmp_path / "old-run"
    shutil.copytree(rich_run, old_run)
    as_an_earlier_version_wrote(old_run)
    for fmt, lora in (("diffusers", "lora/pytorch_lora_weights.safetensors"), ("kohya", "toys.safetensors")):
        today, old = (tmp_path / f"{fmt}-{n}" for n in ("today", "old"))
        for run, dest in ((rich_run, today), (old_run, old)):
            result = invoke("export", run, "--format", fmt, "--out", dest, "--name", "toys")
            assert result.exit_code == 0, result.output
        want, got = load_file(str(today / lora)), load_file(str(old / lora))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_diffusers_export_of_a_full_fine_tune_is_its_pipeline(full_run, invoke, tmp_path):
    dest = tmp_path / "d"
    result = invoke("export", full_run, "--out", dest, "--preview-steps", 2)
    assert result.exit_code == 0, result.output
    assert (dest / "pipeline" / "model_index.json").is_file() and (dest / "preview.png").is_file()
    assert "lora-from-full" in (dest / "README.md").read_text()
    result = invoke("generate", full_run, "a photo of <asset0>", "--lora-scale", 0.5, "--steps", 1, "--num-images", 1)
    assert result.exit_code == 1 and "--lora-scale only applies to runs with LoRA" in result.output


@pytest.mark.parametrize("args, message", [
    (["--format", "lora-from-full"], "is not a full fine-tune"),
    (["--out", "{run}/inside"], "overlaps the run folder"),
    (["--out", "{full}"], "already exists and is not empty; pass --overwrite"),
    (["--format", "kohya", "--rank", 0], None),  # a LoRA run's kohya export does not use --rank
])
def test_export_refuses_what_would_lose_data_or_cannot_work(args, message, rich_run, full_run, invoke, tmp_path):
    args = [str(a).format(run=rich_run, full=full_run) for a in args]
    if "--out" not in args:
        args += ["--out", tmp_path / "x"]
    before = sorted(p.name for p in full_run.iterdir())
    result = invoke("export", rich_run, *args, "--no-preview")
    if message is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1 and message in result.output, result.output
    assert sorted(p.name for p in full_run.iterdir()) == before and not (rich_run / "inside").exists()


def test_rewriting_a_run_folder_leaves_no_stale_embeddings(tmp_path):
    from bas.core import io
    from bas.exports.export import write_run_exports

    info = {"model": "m", "family": "sd", "handles": [], "weights": None, "files": ["handles.safetensors"], "resolution": 64}
    for n in (3, 2):  # an --overwrite run with fewer handles
        handles = {f"<asset{i}>": torch.full((4,), float(i)) for i in range(n)}
        io.write_safetensors(tmp_path / "handles.safetensors", handles)
        written = write_run_exports(tmp_path, dict(info, handles=list(handles)))
    assert written == ["embeddings/asset0.safetensors", "embeddings/asset1.safetensors", "README.md"]
    assert sorted(p.name for p in (tmp_path / "embeddings").iterdir()) == ["asset0.safetensors", "asset1.safetensors"]
    assert "<asset2>" not in (tmp_path / "README.md").read_text()


def test_full_fine_tune_pipeline_loads_in_transformers_4_layout(full_run, tmp_path):
    """pipeline/ of --plugin full: text-encoder weights (handle rows included) under text_model., and
    tokenizer files from which transformers 4.x's CLIPTokenizer knows the handles."""
    from transformers import CLIPTextModel

    from test_formats import assert_tokenizer_files_agree

    weights = load_file(str(full_run / "pipeline" / "text_encoder" / "model.safetensors"))
    assert weights and all(k.startswith("text_model.") for k in weights)
    model, info = CLIPTextModel.from_pretrained(str(full_run / "pipeline" / "text_encoder"), output_loading_info=True)
    assert not any(info.values()), info
    handles = load_file(str(full_run / "handles.safetensors"))
    rows = weights["text_model.embeddings.token_embedding.weight"][-len(handles):]
    assert torch.equal(rows, torch.stack(list(handles.values())))
    config = json.loads((full_run / "pipeline" / "tokenizer" / "tokenizer_config.json").read_text())
    assert {v["content"] for v in config["added_tokens_decoder"].values()} >= set(handles)
    assert_tokenizer_files_agree(full_run / "pipeline" / "tokenizer", tmp_path, ["a photo of <asset0> and <asset1>", "<asset2>"])


def test_paths_with_quotes_and_spaces_stay_one_word_in_hints_and_one_string_in_the_model_card(tiny_model, scene, tmp_path, capsys):
    """The `Try:` line pastes into a shell as the same arguments, and the card's Python names the
    same folders, whatever quotes, spaces or backslashes their names hold."""
    import ast
    import shlex

    from conftest import run_main

    model = tmp_path / 'base "model" \\ x'
    shutil.copytree(tiny_model, model)
    out = tmp_path / "it's my run"
    code, stdout, err = run_main(quick_run_args(scene, model, out), capsys)
    assert code == 0, err
    hint = stdout.split("Try: ", 1)[1].splitlines()[0]
    assert shlex.split(hint) == ["bas", "generate", str(out), "a photo of <asset0> at the beach"]
    python = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    strings = [node.value for node in ast.walk(ast.parse(python)) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert str(model) in strings and f"{out}/lora" in strings and f"{out}/embeddings/asset0.safetensors" in strings


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_every_familys_textual_inversion_code_keeps_a_path_one_string(family):
    import ast

    from bas.core.family import get_family
    from bas.core.plugins import Plugins

    path = 'runs/a "b" \\ c\'s/embeddings/asset0.safetensors'
    code = "\n".join(get_family(Plugins(), family).textual_inversion_code([("<asset0>", path)]))
    strings = [node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert path in strings and (family == "sd" or "<asset0>" in strings)  # SD's files are keyed by their token


@pytest.mark.parametrize("family, model, steps", [("sd", "m", 25), ("flux", "m", 25), ("flux", "black-forest-labs/FLUX.1-schnell", 4)],
                         ids=["sd", "flux dev", "flux schnell"])
def test_a_generated_preview_samples_with_the_runs_own_steps_where_fewer(family, model, steps, tmp_path, monkeypatch):
    """The preview takes 25 steps, or bas generate's steps for the run where fewer (FLUX.1-schnell: 4), from
    the same defaults bas generate uses; --preview-steps still wins."""
    from PIL import Image

    from bas.exports import export
    from bas.generation import generate as generation

    asked = []

    def generate_images(out, prompts, steps=None, out_dir=None, **kwargs):
        asked.append(steps)
        Image.new("RGB", (4, 4)).save(out_dir / "p.png")
        return [out_dir / "p.png"]

    monkeypatch.setattr(generation, "generate_images", generate_images)
    info = {"model": model, "family": family, "handles": ["<asset0>"]}
    export.render_preview(tmp_path, info, tmp_path / "preview.png", None, "cpu", "auto")
    export.render_preview(tmp_path, info, tmp_path / "again.png", 7, "cpu", "auto")
    assert asked == [steps, 7] and (tmp_path / "preview.png").is_file()
