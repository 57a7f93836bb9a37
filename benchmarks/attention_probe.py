"""Look inside an extraction: where each handle's cross-attention goes, how large each loss term's pull is, and when colours swap.

``python -m benchmarks.attention_probe`` extracts a few fidelity-benchmark scenes with and without
the cross-attention loss (same seed, so the runs differ only by the loss) and records, every
``--every`` steps of both phases:

* per cross-attention layer of the denoiser (every level, down and up), at three noise levels,
  each handle's map on the input image (prompt naming every handle, fixed noise): its share of
  attention inside its own mask (``own``), inside the most-attended other concept's mask
  (``other``; a handle looking at its neighbour is where a colour swap starts), and the MSE the
  loss would see at that layer (map divided by its max against the area-averaged mask);
* each loss term's value and the norm of its gradient on the shown handles' rows and (phase 2)
  on the adapted weights, on one extra step batch drawn with the run's random state saved and
  restored, so the probed run learns exactly what an unprobed one does;
* after each phase: ``a photo of <assetK>`` for every handle and four seeds, read back from the
  pixels: its own colour shown, another concept's colour instead (a swap), both, or neither.

Results: ``benchmarks/results/attention-probe-<date>.json`` and a figure beside it (own-mask share
per level over the steps, with and without the loss; each term's gradient norm).
"""

from __future__ import annotations

import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from torch.nn import functional as F

from bas import hookimpl
from benchmarks.commandline import Command
from benchmarks.fidelity import parse_option

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.2, 0.5, 0.8)  # noise levels of the probe, as fractions of the training schedule
SEEDS = (0, 1, 2, 3)


def per_layer_maps(run, fraction: float, seed: int = 0) -> dict[str, tuple[int, torch.Tensor]]:
    """``{layer: (side, maps (N, side, side))}``: every handle's head-averaged map at every cross-attention layer."""
    from bas.core.attention import AttentionStore

    from bas.plugins.attention_loss import probe_forward

    c, family = run.components, run.family
    layers = family.attention_layers(c, run.resolution // c.vae_scale_factor)
    n = run.scene.num_concepts
    stores = {name: AttentionStore(without_grad=True) for name in layers}
    for store in stores.values():
        store.forwards.append((None, []))
    positions = probe_forward(run, {module: family.capture_processor(stores[name]) for name, (module, _) in layers.items()},
                              fraction=fraction, seed=seed)
    out = {}
    for name, (_, side) in layers.items():
        probs = stores[name].forwards[0][1][0][0].float()  # (Q, T) of the one image
        out[name] = (side, probs[:, positions].T.reshape(n, side, side))
    return out


def mask_shares(maps: torch.Tensor, masks: torch.Tensor) -> list[dict]:
    """Per handle: attention share in its own mask, in the most-attended other mask, and the loss's MSE."""
    side = maps.shape[-1]
    m = F.interpolate(masks[None].float(), size=(side, side), mode="area")[0]
    rows = []
    for k in range(maps.shape[0]):
        a = maps[k] / maps[k].sum().clamp(min=1e-12)
        shares = [float((a * m[j]).sum()) for j in range(m.shape[0])]
        others = [s for j, s in enumerate(shares) if j != k]
        normed = maps[k] / maps[k].max().clamp(min=1e-12)
        rows.append({"own": shares[k], "other": max(others) if others else 0.0,
                     "other_handle": int(np.argmax([s if j != k else -1 for j, s in enumerate(shares)])) if others else None,
                     "mse": float(F.mse_loss(normed, m[k]))})
    return rows


def term_gradients(run, phase: int, step: int) -> dict:
    """Each loss term's weighted value and gradient norms on one extra batch; the run's random state is restored after."""
    rng, gen, cpu = run.rng.getstate(), run.generator.get_state(), torch.get_rng_state()
    try:
        batch = run.step_batch(phase, step)
        terms = [t for t in run.resolved.loss_terms if phase in t.phases]
        handles = run.handle_params
        weights = [p for p in run.current.params if all(p is not h for h in handles)]
        result = {"concepts": list(batch.concepts)}
        for term in terms:
            value = term(batch) * term.weight
            grads = torch.autograd.grad(value, handles + weights, retain_graph=True, allow_unused=True)
            g_h = [g for g in grads[: len(handles)] if g is not None]
            g_w = [g for g in grads[len(handles):] if g is not None]
            result[term.name] = {"value": float(value.detach()),
                                 "grad_handles": float(torch.sqrt(sum((g.float() ** 2).sum() for g in g_h))) if g_h else 0.0,
                                 "grad_weights": float(torch.sqrt(sum((g.float() ** 2).sum() for g in g_w))) if g_w else 0.0}
        return result
    finally:
        run.rng.setstate(rng)
        run.generator.set_state(gen)
        torch.set_rng_state(cpu)


def read_swaps(run, concepts) -> dict:
    """``a photo of <assetK>`` per handle and seed, read back: own colour, a neighbour's instead (swap), both, neither."""
    from bas.generation.sampling import sample_run
    from bas.mini import metrics

    prompts = [run.prompt_for([k]) for k in range(len(concepts))]
    rows = sample_run(run, prompts, list(SEEDS))
    counts = {"own": 0, "swap": 0, "both": 0, "neither": 0}
    per_handle = []
    for k, images in enumerate(rows):
        labels = []
        for image in images:
            reading = metrics.read_image(image)
            own = reading.find(colour=concepts[k]["colour"]) is not None
            other = any(reading.find(colour=c["colour"]) is not None for j, c in enumerate(concepts) if j != k)
            label = "both" if own and other else "own" if own else "swap" if other else "neither"
            counts[label] += 1
            labels.append(label)
        per_handle.append(labels)
    return {"counts": counts, "per_handle": per_handle}


class Probe:
    def __init__(self, every: int, concepts: list[dict]):
        self.every, self.concepts = every, concepts
        self.maps: list[dict] = []
        self.gradients: list[dict] = []
        self.swaps: dict[str, dict] = {}

    def probe(self, run, phase: int, step: int) -> None:
        masks = run.masks[0]
        for fraction in FRACTIONS:
            for name, (side, maps) in per_layer_maps(run, fraction).items():
                self.maps.append({"phase": phase, "step": step, "fraction": fraction, "layer": name, "side": side,
                                  "handles": mask_shares(maps, masks)})
        if step > 0:
            self.gradients.append({"phase": phase, "step": step, **term_gradients(run, phase, step + 1)})

    def on_phase_start(self, run, phase):
        self.probe(run, phase, 0)

    def on_step(self, run, record):
        if record.step % self.every == 0 and record.step < record.total_steps:
            self.probe(run, record.phase, record.step)

    def on_phase_end(self, run, phase):
        steps = run.config.phase1_steps if phase == 1 else run.config.phase2_steps
        self.probe(run, phase, steps)
        self.swaps[f"phase{phase}"] = read_swaps(run, self.concepts)


def extract_with_probe(scene_dir: Path, out: Path, every: int, plugins: list[str], options: dict) -> tuple[Probe, dict]:
    from bas.core.api import make_config
    from bas.core.plugins import Plugins
    from bas.core.training import extract
    from benchmarks import fidelity

    info = json.loads((scene_dir / "scene.json").read_text())
    probe = Probe(every, info["objects"])

    class ProbePlugin:
        @hookimpl
        def bas_register_observers(self, register):
            register("probe", lambda config: probe)

    names = [*plugins, "no:report", "no:checkpoints", "no:progress"]
    manager = Plugins(names, extra=[("probe", ProbePlugin())])
    masks = sorted(scene_dir.glob("mask*.png"), key=lambda p: int(p.stem[4:]))
    values = {"image": scene_dir / "img.png", "masks": masks, "out": out, "model": "bas-mini", "device": "cpu",
              "init_tokens": [fidelity.init_word(o["shape"]) for o in info["objects"]], "model_defaults": False,  # as the benchmark
              **options}  # starts them: every setting its own, none of bas-mini's recommended ones
    run = extract(make_config(manager, values, names), manager)
    return probe, run.history


def summarise(probe: Probe) -> dict:
    """Per phase-end and level: mean own and other share over handles, layers at that side and noise levels."""
    out: dict = {}
    for row in probe.maps:
        key = f"phase{row['phase']}-step{row['step']}"
        level = out.setdefault(key, {}).setdefault(str(row["side"]), {"own": [], "other": []})
        for h in row["handles"]:
            level["own"].append(h["own"])
            level["other"].append(h["other"])
    return {k: {side: {m: round(float(np.mean(v)), 3) for m, v in d.items()} for side, d in levels.items()} for k, levels in out.items()}


def markdown_table(result: dict) -> str:
    """A row per scene and variant: the finest maps' own / neighbour share at the start and after each phase (mean over
    handles, layers and noise levels), the attention loss's pull on the handles against the diffusion loss's (the
    ratio of their mean gradient norms per phase), and what single-handle samples drew after each phase (own / swap / both /
    neither)."""
    lines = ["| scene, variant | finest maps own / neighbour, start | after phase 1 | after phase 2 | pull on handles, attention / diffusion "
             "(phase 1; phase 2) | samples after phase 1: own / swap / both / neither | after phase 2 |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        s = r["summary"]
        side = str(max(int(k) for k in s["phase1-step0"]))
        shares = [s[k][side] for k in ("phase1-step0", f"phase1-step{result['steps'][0]}", f"phase2-step{result['steps'][1]}") if k in s]
        pulls = []
        for phase in (1, 2):
            probes = [g for g in r["gradients"] if g["phase"] == phase and "attention" in g]
            diffusion = np.mean([g["diffusion"]["grad_handles"] for g in probes]) if probes else 0.0
            pulls.append(f"{100 * np.mean([g['attention']['grad_handles'] for g in probes]) / diffusion:.1f}%" if diffusion > 0 else "-")
        counts = [r["swaps"][f"phase{p}"]["counts"] for p in (1, 2) if f"phase{p}" in r["swaps"]]
        cells = [f"{x['own']:.2f} / {x['other']:.2f}" for x in shares] + ["; ".join(pulls) if pulls[0] != "-" else "-"]
        cells += [" / ".join(str(c[k]) for k in ("own", "swap", "both", "neither")) for c in counts]
        lines.append(f"| {r['scene']}, {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bas.core import io

    variants = sorted({r["variant"] for r in results["runs"]})
    sides = sorted({row["side"] for r in results["runs"] for row in r["maps"]}, reverse=True)
    fig, axes = plt.subplots(2, len(sides), figsize=(4 * len(sides), 7), squeeze=False)
    for j, side in enumerate(sides):
        ax = axes[0][j]
        for variant in variants:
            for what, style in (("own", "-"), ("other", ":")):
                xs = {}
                for r in (r for r in results["runs"] if r["variant"] == variant):
                    for row in (row for row in r["maps"] if row["side"] == side):
                        x = row["step"] + (0 if row["phase"] == 1 else results["steps"][0])
                        xs.setdefault(x, []).extend(h[what] for h in row["handles"])
                steps = sorted(xs)
                ax.plot(steps, [np.mean(xs[s]) for s in steps], style, label=f"{variant}: {what} mask")
        ax.axvline(results["steps"][0], color="grey", lw=0.5)
        ax.set_title(f"{side}x{side} layers: attention share")
        ax.set_xlabel("step (phase 2 after the line)")
        ax.set_ylim(0, 1)
        if j == 0:
            ax.legend(fontsize=7)
    ax = axes[1][0]
    for variant in variants:
        for term, style in (("diffusion", "-"), ("attention", "--")):
            pts = [(g["step"] + (0 if g["phase"] == 1 else results["steps"][0]), g[term]["grad_handles"])
                   for r in results["runs"] if r["variant"] == variant for g in r["gradients"] if term in g]
            if pts:
                pts.sort()
                ax.semilogy([p[0] for p in pts], [p[1] for p in pts], style, marker=".", lw=0.5, label=f"{variant}: {term}")
    ax.set_title("gradient norm on the shown handles")
    ax.legend(fontsize=7)
    ax = axes[1][1] if len(sides) > 1 else None
    if ax is not None:
        for variant in variants:
            pts = [(g["step"] + (0 if g["phase"] == 1 else results["steps"][0]), g["diffusion"]["value"], g.get("attention", {}).get("value"))
                   for r in results["runs"] if r["variant"] == variant for g in r["gradients"]]
            pts.sort()
            ax.semilogy([p[0] for p in pts], [p[1] for p in pts], "-", lw=0.5, label=f"{variant}: diffusion")
            if any(p[2] for p in pts):
                ax.semilogy([p[0] for p in pts if p[2]], [p[2] for p in pts if p[2]], "--", lw=0.5, label=f"{variant}: attention (weighted)")
        ax.set_title("loss terms (one probe batch)")
        ax.legend(fontsize=7)
    for extra in axes[1][2:]:
        extra.axis("off")
    fig.tight_layout()
    buffer = path.with_suffix(".tmp.png")
    fig.savefig(buffer, dpi=80)
    plt.close(fig)
    io.save_image(path, __import__("PIL.Image", fromlist=["Image"]).open(buffer).convert("RGB"))
    buffer.unlink()


@click.command(cls=Command)
@click.option("--scene", "scenes", multiple=True,
              help="Fidelity-benchmark scenes of the v2 or tuning set, by name [default: four v2 scenes with touching or similar objects]. "
                   "Never the test set's: what is seen there must not steer a choice.")
@click.option("--variant", "variants", multiple=True, type=click.Choice(["full", "no-attention-loss", "attention-x10", "attention-x100"]),
              help="[default: full and no-attention-loss]")
@click.option("--phase1-steps", default=200, show_default=True)
@click.option("--phase2-steps", default=200, show_default=True)
@click.option("--every", type=click.IntRange(min=1), default=25, show_default=True, help="Probe every N steps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--set", "extra", multiple=True, callback=parse_option, help="KEY=VALUE: a bas run option for every run (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default=None)
@click.option("--table", "table_of", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="PROBE.json: print the table of a probe already written; runs nothing.")
def main(scenes, variants, phase1_steps, phase2_steps, every, seed, extra, out, table_of):
    """Probe extractions on bas-mini and write the JSON and figure."""
    from bas.core import io
    from benchmarks import fidelity

    if table_of is not None:
        try:
            click.echo(markdown_table(json.loads(table_of.read_text())))
        except (ValueError, KeyError, TypeError) as exc:
            raise click.UsageError(f"{table_of} is not a probe written by benchmarks/attention_probe.py ({exc!r}).") from None
        return

    torch.set_num_threads(1)
    scenes = list(scenes) or ["cyan-pink-touching", "row-touching", "four-colours", "pink-cyan-orange"]
    known = {**fidelity.SCENES, **fidelity.scene_set("tuning")[0]}
    unknown = [n for n in scenes if n not in known]
    if unknown:
        raise click.UsageError(f"no scene {unknown[0]!r} in the v2 or tuning set; name one of: {', '.join(known)}.")
    variants = list(variants) or ["full", "no-attention-loss"]
    out = io.check_output_file(out or RESULTS / f"attention-probe-{datetime.date.today().isoformat()}.json", "--out")  # before the runs
    if out.suffix == ".png":
        raise click.BadParameter(f"{out} is the name of the figure written beside the JSON; pass a path ending in .json.", param_hint="'--out'")
    io.check_output_file(out.with_suffix(".png"), "The figure beside --out")
    result = {"date": datetime.date.today().isoformat(), "git": fidelity.git_revision(), "steps": [phase1_steps, phase2_steps], "every": every,
              "seed": seed, "fractions": list(FRACTIONS), "options": extra, "runs": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in scenes:
            scene_dir = fidelity.write_scene(Path(tmp) / "scenes" / name, known[name])
            for variant in variants:
                plugins = ["no:attention-loss"] if variant == "no-attention-loss" else []
                kept = fidelity.options_without_plugins_off(fidelity.Ablation(variant, "", plugins), extra)  # no weight for a loss turned off
                options = {"phase1_steps": phase1_steps, "phase2_steps": phase2_steps, "seed": seed, **kept}
                if variant.startswith("attention-x"):
                    options["attention_loss_weight"] = 0.01 * int(variant.split("x")[1])
                t = time.perf_counter()
                probe, history = extract_with_probe(scene_dir, Path(tmp) / "runs" / f"{name}--{variant}", every, plugins, options)
                result["runs"].append({"scene": name, "variant": variant, "maps": probe.maps, "gradients": probe.gradients, "swaps": probe.swaps,
                                       "summary": summarise(probe), "history": history, "seconds": round(time.perf_counter() - t, 1)})
                print(f"{name} {variant}: {time.perf_counter() - t:.0f} s; swaps {json.dumps({k: v['counts'] for k, v in probe.swaps.items()})}",
                      file=sys.stderr, flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    io.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    click.echo(markdown_table(result))
    click.echo(f"Wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
