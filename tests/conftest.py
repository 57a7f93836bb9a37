"""Shared fixtures: tiny models built once per session, a drawn scene, a CLI runner."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may try to download anything
# The suite runs as two pytest-xdist workers on two cores: two-thread OpenMP teams in two processes
# stall each other, one thread each does not.  Subprocesses that tests start inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from click.testing import CliRunner

import bas
from bas.cli import cli
from bas.demo.demo import draw_scene
from bas.demo.tiny import save_tiny_model

# bas's own fixtures for plugin authors; pytest also loads them by bas's pytest11 entry point where bas is
# installed with its metadata (then this finds them registered under the same name and does nothing)
pytest_plugins = ["bas.testing"]

SHARED_SCENES = Path(__file__).resolve().parents[1].parent / "shared" / "scenes"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-v", seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    from bas.plugins.sdxl import StableDiffusionXL

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0, family=StableDiffusionXL())


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory) -> Path:
    from bas.plugins.flux import Flux

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0, family=Flux())


@pytest.fixture(scope="session")
def scene(tmp_path_factory) -> Path:
    return draw_scene(tmp_path_factory.mktemp("scene"))


@pytest.fixture
def invoke():
    runner = CliRunner()

    def _invoke(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return _invoke


def quick_run_args(scene: Path, model: Path, out: Path, *extra) -> list:
    return ["run", "--scene", scene, "--model", model, "--out", out, "--phase1-steps", 3, "--phase2-steps", 3, "--quiet", *extra]


@pytest.fixture(scope="session")
def rich_run(tmp_path_factory, tiny_model, scene) -> Path:
    """A finished LoRA run with a background handle, validation grids and TensorBoard logs: what
    the export, report, generate and edit tests use."""
    out = tmp_path_factory.mktemp("runs") / "rich"
    args = quick_run_args(scene, tiny_model, out, "--background", "--init-token", "ball", "--init-token", "box",
                          "--validation-prompt", "a photo of <asset0> and <asset2>", "--validate-every", 2,
                          "--validation-inference-steps", 2, "--plugin", "tensorboard")
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


EARLIER_RUN_FIELDS = ("checksums", "sealed_folders", "weight_files", "inputs_sha256")  # run.json records newer versions added


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything under ``root``, hidden entries included: (kind, mode, content hash), to compare the files
    before and after a command that must leave them as they were."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        st = os.lstat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        found[path.relative_to(root).as_posix()] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return found


def as_an_earlier_version_wrote(folder: Path) -> Path:
    """Rewrite the finished run in ``folder`` as bas 0.1.0 before the run-folder checks wrote it: its
    run.json without the records newer versions added (files' sizes and SHA-256, the weight files,
    the inputs' hash), no ``inputs/`` copy of the image and masks, and a LoRA with peft's names
    (the scale folded in), as ``lora.py`` wrote before the ComfyUI layout."""
    import json
    import shutil

    from safetensors.torch import save_file

    from bas.exports.formats import read_diffusers_lora

    folder = Path(folder)
    info = json.loads((folder / "run.json").read_text())
    for key in EARLIER_RUN_FIELDS:
        info.pop(key, None)
    info["files"] = [name for name in info["files"] if not name.startswith("inputs/")]
    shutil.rmtree(folder / "inputs", ignore_errors=True)
    lora = folder / "lora" / "pytorch_lora_weights.safetensors"
    if lora.is_file():
        save_file({f"{x.component}.{x.module}.lora_{f}.weight": t for x in read_diffusers_lora(lora) for f, t in (("A", x.down), ("B", x.up))},
                  str(lora), metadata={"format": "pt"})
    (folder / "run.json").write_text(json.dumps(info, indent=2))
    return folder


class Snapshots:
    """An observer plugin that records every trainable module's parameters at the start and end of each
    phase (register it with ``Plugins(names, extra=[("snapshots", Snapshots())])``)."""

    def __init__(self):
        self.start, self.end = {}, {}

    @staticmethod
    def params(run):
        return {f"{prefix}.{name}": p.detach().float().clone()
                for prefix, module in run.components.trainable_modules().items() for name, p in module.named_parameters()}

    def on_phase_start(self, run, phase):
        self.start[phase] = self.params(run)

    def on_phase_end(self, run, phase):
        self.end[phase] = self.params(run)

    @bas.hookimpl
    def bas_register_observers(self, register):
        register("snapshots", lambda config: self)


def changed(snaps, phase) -> set[str]:
    """The names of the parameters that phase ``phase`` changed (or created)."""
    import torch

    start, end = snaps.start[phase], snaps.end[phase]
    return {n for n in end if n not in start or not torch.equal(start[n], end[n])}


def save_tiny_sam(path: Path) -> Path:
    """A random SamModel with its processor, small enough to run per click, saved at ``path``."""
    import torch
    from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

    config = SamConfig(
        vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16,
                           window_size=2, global_attn_indexes=[0], num_pos_feats=4, mlp_dim=16),
        prompt_encoder_config=dict(hidden_size=8, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=8),
    )
    torch.manual_seed(0)
    SamModel(config).save_pretrained(path)
    SamProcessor(SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})).save_pretrained(path)
    return path


def exported_card(run: Path, invoke, tmp_path: Path) -> Path:
    """The model card of ``bas export RUN --format diffusers`` (into ``tmp_path/export``)."""
    result = invoke("export", run, "--format", "diffusers", "--out", tmp_path / "export", "--no-preview")
    assert result.exit_code == 0, result.output
    return tmp_path / "export" / "README.md"


def check_card_writes_the_generated_image(card: Path, run: Path, invoke, tmp_path: Path) -> None:
    """The card's diffusers code, run as written (see :func:`card_image_and_generated`), writes the image ``bas generate`` writes."""
    import numpy as np

    ours, theirs = card_image_and_generated(card, run, invoke, tmp_path)
    np.testing.assert_array_equal(ours, theirs)


def card_image_and_generated(card: Path, run: Path, invoke, tmp_path: Path, steps: int = 2):
    """The image the model card's diffusers code writes, run as written except for the CPU, float32 and
    ``steps`` (bas generate's precision on a CPU, and a short test), and the one ``bas generate`` writes
    for the same prompt and seed 0: two uint8 arrays."""
    import re

    import numpy as np
    from PIL import Image

    from bas.generation.generate import SAMPLING_STEPS, image_stem

    code = re.search(r"```python\n(.*?)```", card.read_text(), re.S).group(1)
    for old, new in (('"cuda"', '"cpu"'), ("torch.bfloat16", "torch.float32"), (f"num_inference_steps={SAMPLING_STEPS},", f"num_inference_steps={steps},"),
                     ('"sample.png"', repr(str(tmp_path / "card.png")))):
        assert old in code, old
        code = code.replace(old, new)
    exec(compile(code, str(card), "exec"), {})
    prompt = re.search(r'image = pipe\("([^"]*)"', code).group(1)
    result = invoke("generate", run, prompt, "--num-images", 1, "--steps", steps, "--device", "cpu", "--out-dir", tmp_path / "bas")
    assert result.exit_code == 0, result.output
    read = lambda path: np.asarray(Image.open(path).convert("RGB"))
    return read(tmp_path / "card.png"), read(tmp_path / "bas" / f"{image_stem(prompt)}-seed0.png")


def run_main(argv, capsys) -> tuple[int, str, str]:
    """``bas ARGV`` as the console script runs it (standalone click: SystemExit, stdout, stderr)."""
    from bas.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
