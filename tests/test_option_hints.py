"""Options people bring from diffusers' and kohya's scripts get a hint naming bas's option."""

from __future__ import annotations

import pytest

from bas.cli import main

RUN = ["run", "--scene", "{scene}", "--out", "{tmp}/o"]


@pytest.mark.parametrize("args, hint", [
    (RUN + ["--output_dir", "x"], "--output_dir; use --out DIR"),
    (RUN + ["--learning_rate", "1e-4"], "use --phase1-lr (the handles alone, 5e-4) and --phase2-lr"),
    (RUN + ["--learning-rate", "1e-4"], "use --phase1-lr"),
    (RUN + ["--rank", "4"], "--rank; use --lora-rank."),
    (RUN + ["--network_dim", "4"], "use --lora-rank."),
    (RUN + ["--mixed_precision", "bf16"], "use --precision auto|fp32|fp16|bf16"),
    (RUN + ["--train_batch_size", "1"], "bas has no such setting: bas trains on its one image"),
    (RUN + ["--max_train_steps", "800"], "use --phase1-steps and --phase2-steps"),
    (RUN + ["--pretrained_model_name_or_path", "m"], "use --model"),
    (RUN + ["--image_size", "512"], "use --resolution."),
    (RUN + ["--res", "512"], "use --resolution."),
    (RUN + ["--use_8bit_adam"], "use --optimizer adamw8bit."),
    (RUN + ["--gradient_checkpointing"], "--gradient_checkpointing; use --gradient-checkpointing."),
    (RUN + ["--checkpointing_steps", "100"], "use --checkpoint-every N."),
    (RUN + ["--resume_from_checkpoint", "latest"], "use --resume (continues"),
    (RUN + ["--validation_prompt", "a photo of <asset0>"], "use --validation-prompt."),
    (RUN + ["--validation_steps", "100"], "use --validate-every N to sample the validation prompts every N steps"),
    (RUN + ["--validation-steps", "25"], "--validation-inference-steps for the sampling steps of each grid (bas's old --validation-steps)"),
    (RUN + ["--random_seed", "3"], "use --seed."),
    (RUN + ["--with_prior_preservation"], "use --plugin prior-preservation."),
    (RUN + ["--class_prompt", "a dog"], "use --plugin prior-preservation --class-prompt"),
    (["generate", "{tmp}", "a dog", "--output_dir", "x"], "use --out-dir DIR."),
    (["generate", "{tmp}", "a dog", "--num_inference_steps", "20"], "use --steps."),
    (["generate", "{tmp}", "a dog", "--guidance_scale", "5"], "use --guidance."),
    (["export", "{tmp}", "--output_dir", "x"], "use --out DIR."),
])
def test_diffusers_style_options_name_bas_options(args, hint, scene, tmp_path, capsys):
    args = [a.format(scene=scene, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("Error: No such option: "), err
    assert hint in lines[0] and "Did you mean" not in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_other_typos_keep_clicks_nearest_spelling(scene, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--scene", str(scene), "--out", str(tmp_path / "o"), "--phase1-step", "3"])
    err = capsys.readouterr().err
    assert err.startswith("Error: No such option") and "--phase1-steps" in err and "; use" not in err, err
