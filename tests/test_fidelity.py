"""The fidelity benchmark (benchmarks/fidelity.py): its scenes are read back exactly from their pixels,
its statistics (nested bootstrap, pairing, Holm) behave as they should on synthetic numbers, and a
two-step run on one scene goes through bas batch and bas eval and writes every field."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bas.core.stats import bootstrap_interval, holm, nested_bootstrap_means, nested_summary
from bas.mini import metrics, world
from bas.plugins.bas_mini import read_concepts, score_reading

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import fidelity  # noqa: E402


# -- the scenes, read back --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(fidelity.SCENES))
def test_every_benchmark_scene_is_read_back_exactly_and_its_masks_name_its_objects(name, tmp_path):
    bench = fidelity.SCENES[name]
    folder = fidelity.write_scene(tmp_path / name, bench)
    image = Image.open(folder / "img.png")
    reading = metrics.read_image(image)
    assert reading.background == bench.background
    assert len(reading.objects) == len(bench.objects)  # touching objects are told apart
    for colour, shape, texture, box in bench.objects:
        found = reading.find(colour=colour)
        assert found is not None and (found.shape, found.texture) == (shape, texture), (colour, found)
        assert max(abs(a - b) for a, b in zip(found.box, box)) <= 1, (found.box, box)
    masks = [np.asarray(Image.open(folder / f"mask{i}.png"), dtype=np.float32) / 255 for i in range(len(bench.objects))]
    background, concepts = read_concepts(image, masks)  # what the evaluator takes each handle to be
    assert background == bench.background
    assert [(c.colour, c.shape, c.texture) for c in concepts] == [o[:3] for o in bench.objects]


def test_benchmark_scenes_cover_what_the_issue_asks():
    scenes = fidelity.SCENES.values()
    assert len(fidelity.SCENES) >= 8 and {len(s.objects) for s in scenes} == {2, 3, 4}
    named = set(world.COLOURS)
    for s in scenes:  # every concept has a colour or a texture no caption names
        assert all(c not in named or t in world.NOVEL_TEXTURES for c, _, t, _ in s.objects)
    masks = [s.masks for s in scenes]
    assert "box" in masks and "loose" in masks
    overlapping = 0
    for _name, s in fidelity.SCENES.items():
        grown = 2 if s.masks == "box" else 3
        boxes = [o[3] for o in s.objects]
        overlapping += any(a[0] < b[2] + grown and b[0] < a[2] + grown and a[1] < b[3] + grown and b[1] < a[3] + grown
                           for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert overlapping >= 3  # touching objects: their masks overlap


def test_split_reading_leaves_shading_inside_one_object_whole():
    image = Image.new("RGB", (64, 64), world.PALETTE["green"])
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 50, 50), fill=world.PALETTE["yellow"])
    draw.ellipse((24, 24, 36, 36), fill=world.PALETTE["orange"])  # a blot of another colour inside: shading, not an object
    reading = metrics.read_image(image)
    assert [(o.colour, o.shape) for o in reading.objects] == [("yellow", "circle")]


def test_entanglement_is_the_share_of_the_input_background_where_another_was_asked():
    scene = world.Scene("grey", [world.Shape("orange", "square", "plain", (8, 8, 40, 40))])
    image = world.render(scene)[0]
    grey_share = metrics.colour_share(image, "grey")
    assert grey_share == pytest.approx(1 - 32 * 32 / 64**2, abs=0.01)
    concepts = [fidelity_concept("orange", "square")]
    reading = metrics.read_image(image)
    asked_yellow = score_reading(reading, concepts, (0,), "grey", "yellow", grey_share)
    assert asked_yellow["entanglement"] == grey_share and asked_yellow["adherence"] == 0.0
    assert "entanglement" not in score_reading(reading, concepts, (0,), "grey", None, None)  # nothing asked
    assert "entanglement" not in score_reading(reading, concepts, (0,), "grey", "grey", grey_share)  # the input's own


def fidelity_concept(colour, shape, texture="plain"):
    from bas.plugins.bas_mini import Concept

    return Concept(colour, shape, texture)


# -- statistics on synthetic numbers ----------------------------------------------------------------
def test_nested_bootstrap_is_seeded_and_a_constant_has_no_spread():
    x = np.random.default_rng(0).normal(size=(8, 3, 4))
    assert np.array_equal(nested_bootstrap_means(x, resamples=500), nested_bootstrap_means(x, resamples=500))
    s = nested_summary(np.full((8, 3, 4), 0.25), resamples=500)
    assert (s["mean"], s["low"], s["high"], s["n"]) == (0.25, pytest.approx(0.25), pytest.approx(0.25), 96)
    with pytest.raises(ValueError, match="finite"):
        nested_bootstrap_means(np.array([[1.0, np.nan]]))


def test_nested_bootstrap_follows_the_scene_spread_where_scenes_dominate():
    rng = np.random.default_rng(3)
    scenes = rng.normal(0.0, 1.0, size=40)
    x = scenes[:, None, None] + rng.normal(0.0, 0.05, size=(40, 3, 4))  # seeds add little
    s = nested_summary(x)
    half = 1.96 * scenes.std(ddof=0) / np.sqrt(scenes.size)  # the bootstrap's plug-in spread of a mean of 40 scenes
    assert (s["high"] - s["low"]) / 2 == pytest.approx(half, rel=0.15)
    flat = bootstrap_interval(x.ravel())  # treating 480 values as independent is far too narrow
    assert flat[1] - flat[0] < 0.4 * (s["high"] - s["low"])


def test_nested_bootstrap_resamples_seeds_within_each_scene():
    # two scenes with the same mean; within each, extraction seeds differ a lot: the seed level must show
    x = np.array([[[0.0] * 4, [1.0] * 4, [0.5] * 4], [[1.0] * 4, [0.0] * 4, [0.5] * 4]])
    s = nested_summary(x)
    assert s["mean"] == 0.5 and s["high"] - s["low"] > 0.3
    assert bootstrap_interval(x.mean(axis=(1, 2))) == (0.5, 0.5)  # resampling scenes alone would see no spread


def test_paired_differences_find_a_small_shift_that_scenes_and_seeds_would_hide():
    rng = np.random.default_rng(7)
    base = rng.normal(0.5, 0.3, size=(8, 3, 1)) + rng.normal(0.0, 0.1, size=(8, 3, 4))  # big scene and seed effects
    values = {"full": {"identity": base},
              "better": {"identity": base + 0.05 + rng.normal(0.0, 0.02, size=base.shape)},  # the same draws, shifted
              "same": {"identity": base + rng.normal(0.0, 0.02, size=base.shape)}}
    ablations = [fidelity.Ablation("full", "", baseline=None), fidelity.Ablation("better", ""), fidelity.Ablation("same", "")]
    metrics_ = fidelity.METRICS
    try:
        fidelity.METRICS = ("identity",)
        stats = fidelity.statistics(values, ablations, resamples=2000)
    finally:
        fidelity.METRICS = metrics_
    better, same = stats["better"]["identity"]["difference"], stats["same"]["identity"]["difference"]
    assert better["significant"] and better["holm"] and 0.04 < better["low"] < better["mean"] < better["high"] < 0.06
    assert not same["significant"] and same["low"] < 0 < same["high"] and not same["holm"]
    assert "difference" not in stats["full"]["identity"]
    # unpaired, the two means' intervals overlap: the shift is within the scenes' spread
    a, b = stats["full"]["identity"]["value"], stats["better"]["identity"]["value"]
    assert b["low"] < a["high"]


def test_holm_rejects_in_order_and_stops_at_the_first_that_fails():
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]  # 0.005 < .0125, 0.01 < .0167, 0.03 > .025: stop
    assert holm([0.001, 0.002]) == [True, True] and holm([0.2]) == [False] and holm([]) == []


def test_p_value_never_reaches_zero_with_finite_resamples():
    s = nested_summary(np.full((4, 2, 2), 1.0), resamples=999)
    assert s["p"] == pytest.approx(2 / 1000)


# -- variants: a measured sweep on the same scenes and seeds ------------------------------------------
def test_a_variant_is_an_ablation_of_run_options_against_full_or_the_baseline_it_names():
    v = fidelity.parse_variant("attn-w0.1:attention_loss_weight=0.1,attention-res=8,mask_loss=false,tag=x")
    assert (v.name, v.baseline, v.plugins) == ("attn-w0.1", "full", [])
    assert v.options == {"attention_loss_weight": 0.1, "attention_res": 8, "mask_loss": False, "tag": "x"}
    w = fidelity.parse_variant("ft-lr1e-5:plugins=full+no:union-sampling,phase2_lr=1e-5,vs=full-finetune")
    assert (w.baseline, w.plugins, w.options) == ("full-finetune", ["full", "no:union-sampling"], {"phase2_lr": 1e-5})
    assert "--plugin full" in w.what and "phase2_lr=1e-05" in w.what
    # only the variants and the baselines they need run, in table order; --ablation adds to them
    assert [a.name for a in fidelity.with_baselines(None, [v, w])] == ["full", "full-finetune", "attn-w0.1", "ft-lr1e-5"]
    assert [a.name for a in fidelity.with_baselines(["no-union-sampling"], [v])] == ["full", "no-union-sampling", "attn-w0.1"]
    assert [a.name for a in fidelity.with_baselines(None)] == fidelity.ABLATION_NAMES
    # a variant compared with another variant: a sweep of one claim at other settings
    fast = fidelity.parse_variant("lr10x:phase1_lr=5e-3,phase2_lr=1e-3")
    fast_no_attn = fidelity.parse_variant("lr10x-no-attn:phase1_lr=5e-3,phase2_lr=1e-3,plugins=no:attention-loss,vs=lr10x")
    assert [a.name for a in fidelity.with_baselines(None, [fast_no_attn, fast])] == ["full", "lr10x-no-attn", "lr10x"]
    assert fidelity.parse_variants(None, None, ["a:x=1,vs=b", "b:x=2"])[0].baseline == "b"
    # a variant on the full fine-tune gets the full fine-tune's phase-2 rate
    assert fidelity.strategy_rates(w, {"phase2_lr": 3e-4, "full_phase2_lr": 2e-6}) == {"phase2_lr": 2e-6}


@pytest.mark.parametrize("text, says", [
    ("attn", "is not NAME:KEY=VALUE"), ("Attn:x=1", "is not NAME:KEY=VALUE"), ("a--b:x=1", "is not NAME:KEY=VALUE"),
    ("../x:x=1", "is not NAME:KEY=VALUE"), ("full:x=1", "is a built-in ablation's"), ("v:x", "is not KEY=VALUE"),
    ("v:x=1,vs=nothing", "is neither an ablation nor another variant"), ("v:x=1,vs=v", "is neither an ablation nor another variant"),
])
def test_a_bad_variant_is_one_clear_error_line(text, says):
    from click.testing import CliRunner

    result = CliRunner().invoke(fidelity.main, ["--variant", text, "--work", "/nonexistent/never-made"])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output
    assert not Path("/nonexistent/never-made").exists()


def test_two_variants_of_one_name_are_one_clear_error_line():
    from click.testing import CliRunner

    result = CliRunner().invoke(fidelity.main, ["--variant", "a:x=1", "--variant", "a:x=2", "--work", "/nonexistent/never-made"])
    assert result.exit_code == 2 and "two variants are named 'a'" in result.output and "Traceback" not in result.output


# -- a two-step run ---------------------------------------------------------------------------------
def test_two_step_benchmark_on_one_scene_writes_paired_results(tmp_path):
    out = tmp_path / "fidelity.json"
    variant = fidelity.parse_variant("attn-w1:attention_loss_weight=1")
    result = fidelity.run_benchmark(out, scenes=["purple-orange"], ablations=["no-masked-loss"], variants=[variant], steps=(2, 2),
                                    extraction_seeds=[0], seeds=[0], sample_steps=2, work=tmp_path / "work", resamples=200, log=lambda m: None)
    saved = json.loads(out.read_text())
    assert saved["table"] == result["table"] and saved["table"].count("\n") == 4  # header, rule, full, no-masked-loss, the variant
    assert list(saved["ablations"]) == ["full", "no-masked-loss", "attn-w1"]  # the baseline is added, the variant last
    assert saved["ablations"]["attn-w1"]["baseline"] == "full" and saved["ablations"]["attn-w1"]["options"] == {"attention_loss_weight": 1}
    assert saved["ablations"]["no-masked-loss"]["baseline"] == "full"
    for name in ("full", "no-masked-loss"):
        for metric in fidelity.METRICS + fidelity.IDENTITY_PARTS:
            v = np.array(saved["ablations"][name]["values"][metric])
            assert v.shape == (1, 1, 1) and 0.0 <= v.min() <= v.max() <= 1.0
    diff = saved["stats"]["no-masked-loss"]["leakage"]["difference"]
    values = saved["ablations"]
    assert diff["mean"] == pytest.approx(values["no-masked-loss"]["values"]["leakage"][0][0][0] - values["full"]["values"]["leakage"][0][0][0])
    runs = tmp_path / "work" / "runs"
    info = json.loads((runs / "purple-orange--no-masked-loss--e0" / "run.json").read_text())
    assert info["config"]["options"]["mask_loss"] is False and info["handles"] == ["<asset0>", "<asset1>"]
    assert info["init_tokens"] == ["circle", "square"]
    variant_info = json.loads((runs / "purple-orange--attn-w1--e0" / "run.json").read_text())
    assert variant_info["config"]["options"]["attention_loss_weight"] == 1 and info["config"]["options"].get("attention_loss_weight", 0.01) == 0.01
    assert json.loads((runs / "batch.json").read_text())["scenes"][0]["status"] == "done"  # through bas batch
    ev = json.loads((tmp_path / "work" / "eval" / "purple-orange--full--e0" / "eval.json").read_text())
    assert list(ev["evaluators"]) == ["bas-mini"] and len(ev["images"]) == 2 + 1 + 4 + len(fidelity.PRIOR_PROMPTS)  # identity, composition, backgrounds, prior
    assert all(set(img["scores"]) == {"prior"} for img in ev["images"] if img["prompt"] in fidelity.PRIOR_PROMPTS)
    assert (out.with_suffix("") / "no-masked-loss.png").is_file() and set(saved["times"]) >= {"extraction_s", "evaluation_s", "total_s"}


def test_captions_of_the_world_parse_back_to_their_scenes_and_nothing_else_does():
    rng = random.Random(5)
    for _ in range(200):
        scene = world.random_scene(rng, counts=(1, 2, 3), count_weights=(1, 1, 1))
        ordered = sorted(scene.objects, key=lambda o: o.box[0])
        for photo_of in (True, False):
            parsed = world.parse_caption(scene.caption(photo_of=photo_of))
            assert parsed.background == scene.background
            assert [(o.colour, o.shape, o.texture) for o in parsed.objects] == [(o.colour, o.shape, o.texture) for o in ordered]
    for text in ("a photo of <asset0>", "a photo of <asset0> on a yellow background", "a red circle", "a photo of a red cube on a blue background",
                 "a photo of a red wavy circle on a blue background", "a photo of a red circle on a plaid background", ""):
        assert world.parse_caption(text) is None, text


def test_prior_metric_is_all_correct_of_a_caption_without_handles(tmp_path):
    from bas.core.evaluation import EvalRun, Sample
    from bas.plugins.bas_mini import BasMini

    rng = random.Random(3)
    drawn = world.random_scene(rng, objects=[("red", "circle", "plain")], background="blue")
    image, masks = world.render(drawn)
    image.save(tmp_path / "s.png")
    run = EvalRun("r", tmp_path, {"handles": ["<asset0>"], "model": "bas-mini"}, inputs=(image, [m.astype(np.float32) for m in masks]))
    prompts = {"a photo of a red circle on a blue background": 1.0, "a photo of a red square on a blue background": 0.0,
               "a photo of a red circle on a green background": 0.0, "a photo of a red circle and a green square on a blue background": 0.0}
    samples = [Sample("r", p, (), 0, None, tmp_path / "s.png") for p in prompts]
    scores = list(BasMini().score(run, samples + [Sample("r", "a photo of something", (), 0, None, tmp_path / "s.png")]))
    assert [s["prior"] for s in scores[:-1]] == list(prompts.values()) and scores[-1] == {}
