"""The example plugin's tests, on bas's tiny models: the fixtures bas_tiny_model, bas_tiny_model_of,
bas_scene, bas_run_args and bas_cli come from bas.testing, which pytest loads wherever bas is installed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bas_plugin_example import Colourfulness, OutsideLoss, colourfulness


def test_bas_lists_the_plugin_with_its_loss_term_and_evaluator(bas_cli):
    result = bas_cli("plugins")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("example  ["))
    assert "opt-in (--plugin example)" in line and "bas-plugin-example 1.0.0" in line
    assert "loss term 'outside-loss'" in result.stdout and "evaluator 'colourfulness'" in result.stdout


def test_outside_loss_counts_only_the_error_outside_the_masks():
    term = OutsideLoss(SimpleNamespace(options={"outside_weight": 0.5}))
    target = torch.zeros(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1  # the top half is a concept
    inside_wrong = target.clone()
    inside_wrong[..., :4, :] = 1
    outside_wrong = target.clone()
    outside_wrong[..., 4:, :] = 1

    def loss(pred):
        return term(SimpleNamespace(model_pred=pred, target=target, union_mask=mask)).item()

    assert term.weight == 0.5 and loss(inside_wrong) == 0 and loss(outside_wrong) == pytest.approx(0.5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_run_with_the_plugin_trains_its_term_with_its_weight(bas_cli, bas_scene, bas_tiny_model_of, tmp_path, family):
    out = tmp_path / "run"
    result = bas_cli(
        "run",
        "--scene",
        bas_scene,
        "--model",
        bas_tiny_model_of(family),
        "--out",
        out,
        "--phase1-steps",
        2,
        "--phase2-steps",
        2,
        "--quiet",
        "--plugin",
        "example",
        "--outside-weight",
        0.25,
    )
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["family"] == family and info["plugins"]["example"]["version"] == "1.0.0"
    assert {"name": "outside-loss", "weight": 0.25, "phases": [1, 2]} in info["loss_terms"]


def test_a_wrong_weight_is_one_error_line_and_no_run(bas_cli, bas_run_args, tmp_path):
    result = bas_cli(*bas_run_args, "--plugin", "example", "--outside-weight", -1)
    assert result.exit_code != 0 and result.stderr.startswith("Error: ") and "--outside-weight must be positive" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_colourfulness_is_zero_for_grey_and_grows_with_colour():
    grey = np.full((8, 8, 3), 128.0)
    stripes = np.zeros((8, 8, 3))
    stripes[::2, :, 0] = 255  # red and black rows
    assert colourfulness(grey) == 0 and colourfulness(stripes) > 50
    assert [m.name for m in Colourfulness.metrics] == ["colourfulness"]


def test_bas_eval_scores_a_run_with_the_evaluator(bas_cli, bas_run_args, tmp_path):
    assert bas_cli(*bas_run_args).exit_code == 0
    result = bas_cli(
        "eval",
        tmp_path / "run",
        "--out",
        tmp_path / "eval",
        "--plugin",
        "example",
        "--evaluator",
        "colourfulness",
        "--num-images",
        1,
        "--steps",
        2,
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())["summary"]["run"]
    assert summary["colourfulness"]["mean"] >= 0
