"""The memory plan (bas.memory): checked against the measured CPU peak on the tiny models, and
`--vram` choosing settings at real shapes from the shipped configs (no weights, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bas.core.api import make_config
from bas.core.plugins import Plugins
from bas.memory.measure import measure_run
from bas.memory.plan import make_plan
from bas.memory.vram import GIB, HEADROOM, fit
from conftest import run_main  # noqa: E402

TOLERANCE = 0.10  # the bound: plan within 10% of the measured peak


def config_for(model, scene, names=(), **values):
    plugins = Plugins(list(names))
    return make_config(plugins, {"out": Path("unused"), "model": str(model) if model else None, "scene": scene, **values}, list(names)), plugins


@pytest.mark.parametrize("family, names", [("sd", ()), ("sd", ("full",)), ("sdxl", ()), ("sdxl", ("full",)), ("flux", ())])
def test_plan_peak_matches_the_measured_cpu_peak(family, names, request, scene):
    """Every family and strategy: the plan on fake tensors against a real CPU run's live tensor bytes (profiler)."""
    model = request.getfixturevalue({"sd": "tiny_model", "sdxl": "tiny_sdxl_model", "flux": "tiny_flux_model"}[family])
    config, plugins = config_for(model, scene, names, device="cpu")
    plan = make_plan(config, plugins)
    measured = measure_run(*config_for(model, scene, names, device="cpu"))
    assert plan.family == family and plan.strategy == (names[0] if names else "lora")
    for phase in ("phase1", "phase2"):
        predicted = plan.phases[phase]["peak"]
        assert abs(predicted / measured[phase] - 1) <= TOLERANCE, (phase, predicted, measured[phase])
    # phase 2 trains more than the handles: its trainable parameters, gradients and optimizer states show it
    p1, p2 = plan.phases["phase1"], plan.phases["phase2"]
    assert p2["trainable_params"] > p1["trainable_params"] and p2["gradients"] == p2["trainable_params"]
    assert p2["optimizer_states"] == 2 * p2["trainable_params"]  # AdamW: two fp32 states per fp32 parameter
    assert p1["attention_maps"] > 0 and p1["activations"] > p1["attention_maps"]


def test_plan_of_a_published_pipeline_reads_no_weights(capsys):
    """The default model (SD 2.1 base) planned for CUDA from the shipped configs: a real-shape plan,
    offline (HF_HUB_OFFLINE), as JSON on stdout, without --out."""
    code, out, err = run_main(["run", "--plan", "--json", "--device", "cuda"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["model"] == "stabilityai/stable-diffusion-2-1-base" and plan["precision"] == "bf16" and plan["resolution"] == 512
    # SD 2.1 base: an 866M-parameter UNet and a 340M-parameter text encoder, frozen in bf16
    assert 2.2e9 < plan["phases"]["phase1"]["frozen_weights"] < 2.6e9
    assert plan["attention_kernels"].get("flash", 0) > 0  # the UNet's attention as a GPU runs it: no attention matrix kept
    assert set(plan["phases"]) == {"load", "phase1", "phase2"} and plan["peak"] == max(p["peak"] for p in plan["phases"].values())


@pytest.fixture(scope="module")
def sd15():
    return "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_vram_chooses_settings_in_order_at_real_shapes(sd15):
    """SD 1.5 LoRA at 512 px on CUDA: a large budget needs nothing, a tight one gradient checkpointing
    first; each choice's plan fits its budget."""
    config, plugins = config_for(sd15, None, device="cuda")
    roomy = fit(config, plugins, 16)
    assert roomy.chose == [] and roomy.config.gradient_checkpointing is False and roomy.config.optimizer == "adamw"
    plain = roomy.plan.peak
    checkpointed = fit(config, plugins, (plain + HEADROOM) / GIB - 0.01)  # just below what the plain settings need
    assert checkpointed.chose[0] == "--gradient-checkpointing" and checkpointed.config.gradient_checkpointing is True
    assert checkpointed.plan.peak < plain and checkpointed.plan.peak + HEADROOM <= ((plain + HEADROOM) / GIB - 0.01) * GIB


def test_vram_keeps_explicit_options(sd15):
    config, plugins = config_for(sd15, None, device="cuda", gradient_checkpointing=False)
    with pytest.raises(Exception) as error:
        fit(config, plugins, 2.5, explicit={"gradient_checkpointing", "lora_rank", "optimizer"})
    assert "Nothing bas can choose fits this run in 2.5 GB" in str(error.value)


def test_vram_budget_nothing_meets_is_one_error_line(capsys):
    code, out, err = run_main(["run", "--plan", "--vram", "1", "--model", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--device", "cuda"], capsys)
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: Nothing bas can choose fits this run in 1 GB")
    assert "use --vram " in lines[0]
    needed = int(lines[0].split("use --vram ")[1].split()[0])
    assert needed >= 2  # the frozen UNet alone is 1.6 GB in bf16
