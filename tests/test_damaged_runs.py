"""Damaged run folders and unusable inputs: one ``Error:`` line naming the fix, in every command that reads a run.

Each case copies a finished tiny run, damages it as a disk, a hand edit or another tool would (garbage
or an empty LoRA, with or without run.json's checksums agreeing; run.json fields of the wrong type; a
plugin that is not installed; a base model that is gone), runs the commands through the console
script's entry point and asserts the exit code, the one line and that no file changed or was left.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save, save_file

from bas.cli import cli

from conftest import quick_run_args, run_main, snapshot
from test_eval import metric_models  # noqa: F401  (a fixture: bas eval's tiny CLIP, DINO and CLIPSeg)

LORA = "lora/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_model, scene) -> Path:
    """A finished LoRA run whose concepts have class words (so bas eval's clip-prompt scores it)."""
    out = tmp_path_factory.mktemp("good") / "good"
    args = quick_run_args(scene, tiny_model, out, "--init-token", "ball", "--init-token", "box", "--plugin", "no:report")
    args[args.index("--phase1-steps") + 1] = args[args.index("--phase2-steps") + 1] = 2
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def work(tmp_path, good, scene) -> Path:
    """``tmp_path`` with a copy of the good run as ``runs/run`` and the scene as ``scene/``."""
    shutil.copytree(good, tmp_path / "runs" / "run")
    shutil.copytree(scene, tmp_path / "scene")
    return tmp_path


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err
    return lines[0]


def edit_json(out: Path, change) -> None:
    info = json.loads((out / "run.json").read_text())
    change(info)
    (out / "run.json").write_text(json.dumps(info))


def replace_lora(out: Path, data: bytes, checksums: bool) -> None:
    """The LoRA file replaced by ``data``; run.json's record of it updated to agree, or (as runs before
    bas 0.2 have none) its checksums left out."""
    (out / LORA).write_bytes(data)

    def change(info):
        if checksums:
            info["checksums"][LORA] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        else:
            info.pop("checksums")

    edit_json(out, change)


def commands(work: Path, models: dict) -> dict[str, list]:
    run, scene = work / "runs" / "run", work / "scene"
    clip = ["--evaluator", "clip-prompt", "--clip-model", models["clip"]]
    return {
        "generate": ["generate", run, "a photo of <asset0>", "--steps", 1, "--num-images", 1, "--device", "cpu"],
        "edit": ["edit", run, "a photo of <asset0>", "--image", scene / "img.png", "--mask", scene / "mask0.png", "--steps", 1, "--device", "cpu"],
        "export-diffusers": ["export", run, "--format", "diffusers", "--out", work / "exported", "--no-preview"],
        "export-kohya": ["export", run, "--format", "kohya", "--out", work / "exported", "--no-preview"],
        "eval": ["eval", run, "--out", work / "ev", "--num-images", 1, "--steps", 1, "--device", "cpu", "--quiet", *clip],
    }


def refused_by_all(work: Path, models: dict, capsys, start: str, fix: str, only=None) -> None:
    """Each command (or those in ``only``) exits 1 with one line that starts with ``start`` and ends with ``fix``,
    and leaves every file as it was (no image, no export, no eval staging folder)."""
    before = snapshot(work)
    for name, args in commands(work, models).items():
        if only and name not in only:
            continue
        code, _, err = run_main(args, capsys)
        line = error_line(err)
        assert code == 1 and line.startswith(f"Error: {start}") and line.endswith(fix), (name, line)
        assert snapshot(work) == before, name


DAMAGED_FIX = "; the run folder is damaged: restore it from a copy or re-run `bas run`."
GARBAGE = "cannot be read as safetensors (SafetensorError: Error while deserializing header: header too large)"


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums-agree", "no-checksums"])
def test_a_garbage_lora_file_is_one_line_naming_it_in_every_command(checksums, work, metric_models, capsys):  # noqa: F811
    replace_lora(work / "runs" / "run", b"garbage" * 10, checksums)
    refused_by_all(work, metric_models, capsys, f"{work / 'runs' / 'run' / LORA} {GARBAGE}", DAMAGED_FIX)


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums-agree", "no-checksums"])
def test_a_lora_file_without_tensors_is_refused_not_generated_or_exported_without_the_lora(checksums, work, metric_models, capsys):  # noqa: F811
    replace_lora(work / "runs" / "run", save({}, {"format": "pt"}), checksums)
    refused_by_all(work, metric_models, capsys, f"{work / 'runs' / 'run' / LORA} holds no weights (no tensor)", DAMAGED_FIX)


def test_a_lora_file_without_lora_weights_is_refused_before_the_model_loads(work, metric_models, capsys):  # noqa: F811
    replace_lora(work / "runs" / "run", save({"something.else": torch.zeros(2)}), True)
    refused_by_all(work, metric_models, capsys, f"{work / 'runs' / 'run' / LORA} holds no LoRA weights", DAMAGED_FIX, only=("generate", "edit"))


def test_a_truncated_lora_file_is_one_line(work, metric_models, capsys):  # noqa: F811
    data = (work / "runs" / "run" / LORA).read_bytes()
    replace_lora(work / "runs" / "run", data[: len(data) // 2], False)
    refused_by_all(work, metric_models, capsys, f"{work / 'runs' / 'run' / LORA} cannot be read as safetensors", DAMAGED_FIX)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("family", ["sd"], "run.json has no valid 'family' (a family name such as \"sd\")"),
        ("family", 3, "run.json has no valid 'family' (a family name such as \"sd\")"),
        ("plugin_names", "lora", "run.json has no valid 'plugin_names' (a list of plugin names)"),
        ("plugin_names", ["lora", 7], "run.json has no valid 'plugin_names' (a list of plugin names)"),
    ],
)
def test_run_json_fields_of_the_wrong_type_are_refused_by_every_command(field, value, message, work, metric_models, capsys):  # noqa: F811
    edit_json(work / "runs" / "run", lambda info: info.__setitem__(field, value))
    refused_by_all(work, metric_models, capsys, f"{work / 'runs' / 'run'}/{message}", "; the folder is damaged, re-run `bas run`.")


def test_a_run_made_with_a_plugin_that_is_not_installed_says_so_and_to_install_it(work, metric_models, capsys):  # noqa: F811
    edit_json(work / "runs" / "run", lambda info: info.__setitem__("plugin_names", ["no:report", "acme-weights"]))
    refused_by_all(
        work,
        metric_models,
        capsys,
        f"{work / 'runs' / 'run'} was made with the plugin 'acme-weights' (its run.json names it), which is not installed; "
        "install the package that provides 'acme-weights'",
        "then run the command again.",
    )


def test_a_run_whose_base_model_is_gone_names_the_run_not_an_option_the_command_lacks(work, metric_models, capsys):  # noqa: F811
    gone = work / "model"
    gone.mkdir()  # what is left of the model folder: no model_index.json
    edit_json(work / "runs" / "run", lambda info: info.__setitem__("model", str(gone)))
    run = work / "runs" / "run"
    start = (
        f'{gone} is not a diffusers pipeline folder (it has no model_index.json); the run {run} was made with it (its run.json\'s "model"): '
        "put the model the run was made with back at that path"
    )
    # eval fails while generating, after its staging folder was made: that folder goes too
    refused_by_all(work, metric_models, capsys, start, ", or re-run `bas run` with a model that loads.", only=("generate", "edit", "eval"))


def test_a_prompts_file_that_is_not_utf8_is_one_line_in_eval_as_in_generate(work, metric_models, capsys):  # noqa: F811
    prompts = work / "p.txt"
    prompts.write_bytes(b"x \xff\n")
    cases = {
        "eval": (commands(work, metric_models)["eval"] + ["--prompts", prompts], "one prompt or template ({} for the handles) per line."),
        "generate": (["generate", work / "runs" / "run", "--prompts-file", prompts, "--steps", 1, "--device", "cpu"], "one prompt per line."),
    }
    before = snapshot(work)
    for name, (args, what) in cases.items():
        code, _, err = run_main(args, capsys)
        assert code == 1 and error_line(err) == f"Error: Prompts file {prompts} is not UTF-8 text; save it as plain text with {what}", name
        assert snapshot(work) == before, name


def test_a_folder_given_for_a_file_says_it_is_a_folder(work, metric_models, capsys):  # noqa: F811
    folder = work / "afolder"
    folder.mkdir()
    run, scene = work / "runs" / "run", work / "scene"
    edit = ["edit", run, "a photo of <asset0>", "--steps", 1, "--device", "cpu"]
    cases = [
        (
            ["generate", run, "--prompts-file", folder, "--device", "cpu"],
            f"Prompts file {folder} is a folder; pass a text file with one prompt per line.",
        ),
        (
            commands(work, metric_models)["eval"] + ["--prompts", folder],
            f"Prompts file {folder} is a folder; pass a text file with one prompt or template ({{}} for the handles) per line.",
        ),
        (
            edit + ["--image", folder, "--mask", scene / "mask0.png"],
            f"Image file {folder} is a folder, not a file; pass a JPEG or PNG file with --image.",
        ),
        (edit + ["--image", scene / "img.png", "--mask", folder], f"Mask file {folder} is a folder, not a file; pass an existing PNG with --mask."),
    ]
    before = snapshot(work)
    for args, message in cases:
        code, _, err = run_main(args, capsys)
        assert code == 1 and error_line(err) == f"Error: {message}", args[0]
        assert snapshot(work) == before, args[0]


def test_a_plugins_model_with_that_plugin_turned_off_says_so_without_asking_the_hub(work, capsys, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: asked.append(a))
    before = snapshot(work)
    code, _, err = run_main(
        [
            "run",
            "--plugin",
            "no:bas-mini",
            "--model",
            "bas-mini",
            "--scene",
            work / "scene",
            "--out",
            work / "new",
            "--phase1-steps",
            1,
            "--phase2-steps",
            1,
            "--device",
            "cpu",
            "--quiet",
        ],
        capsys,
    )
    assert code == 1 and error_line(err) == (
        "Error: Model 'bas-mini' is provided by the bas-mini plugin, which --plugin no:bas-mini turned off; "
        "leave out --plugin no:bas-mini to use bas-mini, or pass another --model."
    )
    assert asked == [] and snapshot(work) == before


def test_the_weight_reader_names_the_file_for_any_unreadable_safetensors(tmp_path):
    from bas.core.errors import BasError
    from bas.core.runs import read_weights

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4)}, str(path))
    assert set(read_weights(path)) == {"a"}
    for data in (b"", b"\x08" + b"\0" * 7 + b"{}", b"garbage" * 10, path.read_bytes()[:-3]):
        path.write_bytes(data)
        with pytest.raises(
            BasError, match=rf"^{path} (cannot be read as safetensors|holds no weights).*restore it from a copy or re-run `bas run`\.$"
        ):
            read_weights(path)
