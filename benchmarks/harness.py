"""One measured extraction: the real ``Run`` with the real plugins, timed, with its peak memory and FLOPs.

Each configuration is measured in its own process (``python -m benchmarks.harness SPEC OUT``), so a
peak RSS on the CPU belongs to that configuration alone.  A :class:`Variant` says which of the
ways to speed and memory are on; the product's defaults are ``Variant()`` and the reference
code's way of training is :data:`REFERENCE_STYLE`.  The knobs that ``bas run`` does not have are
made here, around the product code, never inside it:

* ``cached_latents=False``: the VAE encodes the image (and the class image) at every step.
* ``fused_attention=False``: every attention layer of the UNet and text encoder computes explicit
  softmax probabilities (diffusers' ``AttnProcessor``, transformers' eager attention).
* ``handle_rows_only=False``: the whole token-embedding matrix trains, and phase 1 restores
  every old row after each step.
* ``skip_frozen_grads=False``: phase 1 also computes gradients of the frozen UNet and text encoder.
* ``prior_in_phase1=True``: the prior-preservation loss is computed in phase 1 too (its gradient
  there is zero; the product skips it).
* ``channels_last``, ``compile``: the UNet in channels-last memory format, ``torch.compile``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

import bas
from bas.core.training import Run
from benchmarks.commandline import json_kind, one_line

PAPER_STEPS = (400, 400)  # the paper's phase 1 + phase 2 schedule


@dataclass(frozen=True)
class Variant:
    strategy: str = "lora"
    precision: str = "auto"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    prior_preservation: bool = True  # one class image per step, as the reference code's default
    prior_in_phase1: bool = False  # the reference computes the prior loss in phase 1 too, where its gradient is zero
    cached_latents: bool = True
    fused_attention: bool = True
    handle_rows_only: bool = True
    skip_frozen_grads: bool = True
    channels_last: bool = False
    compile: bool = False
    quantize: str | None = None  # None: what `bas run` picks for the family and device (FLUX on CUDA: nf4)


# The reference code (../shared/METHOD.md): explicit attention everywhere, VAE every step, full
# fine-tune of UNet and text encoder with the whole embedding matrix, fp32, plain AdamW, prior
# preservation with a batch of 2 (here: a second forward of one class image, as the plugin does).
REFERENCE_STYLE = Variant(
    strategy="full", precision="fp32", optimizer="adamw-reference", prior_preservation=True, prior_in_phase1=True,
    cached_latents=False, fused_attention=False, handle_rows_only=False,
)

# Each ablation changes one setting of the measured bas configuration.
ABLATIONS: dict[str, dict] = {
    "vae-every-step": {"cached_latents": False},
    "explicit-attention": {"fused_attention": False},
    "embedding-matrix": {"handle_rows_only": False},
    "frozen-grads": {"skip_frozen_grads": False},
    "full": {"strategy": "full"},
    "lora": {"strategy": "lora"},
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "grad-checkpointing": {"gradient_checkpointing": True},
    "nf4": {"quantize": "nf4"},
    "int8": {"quantize": "int8"},
    "no-quantize": {"quantize": "none"},
    "no-grad-checkpointing": {"gradient_checkpointing": False},
    "adamw-fused": {"optimizer": "adamw-fused"},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "channels-last": {"channels_last": True},
    "compile": {"compile": True},
    "no-prior": {"prior_preservation": False},
    "prior-in-phase1": {"prior_in_phase1": True},
}


# -- the plugin the harness adds: a measuring observer and two optimizers ----------------------
def adamw_reference(param_groups, config):
    """torch.optim.AdamW with the reference code's defaults (beta2 0.999, weight decay 1e-2), not fused."""
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def adamw_fused(param_groups, config):
    """The product's AdamW with fused kernels on any device (the product fuses on CUDA only)."""
    from bas.plugins.adamw import _kwargs

    return torch.optim.AdamW(param_groups, fused=True, **_kwargs(config))


def sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's FLOP counter knows the CUDA attention kernels but not the CPU one; without these the
# fused path would count its attention as free.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward_flops,
}


_rss_peak_before_resets = 0  # resetting VmHWM resets ru_maxrss too: keep the process's peak here


def _ru_maxrss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_memory(device: torch.device) -> None:
    global _rss_peak_before_resets
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    _rss_peak_before_resets = max(_rss_peak_before_resets, _ru_maxrss())
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA max allocated since the last reset, or the process's peak RSS since the last reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _ru_maxrss()


def peak_rss_since_start() -> int:
    """Bytes: the process's peak RSS over its whole life, loading included."""
    return max(_rss_peak_before_resets, _ru_maxrss())


class Meter:
    """Step times from one step's end to the next (synchronised on CUDA), wall-clock and the
    process's CPU time (which a busy shared machine disturbs far less), peak memory per phase, and
    the FLOPs of each phase's last step, which is counted rather than timed."""

    def __init__(self, warmup: int, count_flops: bool):
        self.warmup, self.count_flops = warmup, count_flops
        self.phases: dict[str, dict] = {}
        self.counter = None

    def on_phase_start(self, run, phase):
        self.current = self.phases[f"phase{phase}"] = {"step_seconds": [], "step_cpu_seconds": []}
        reset_peak_memory(run.device)
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def on_run_start(self, run):
        run.before_training()

    def on_step(self, run, record):
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        now, now_cpu = time.perf_counter(), time.process_time()
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.current["flops_per_step"] = self.counter.get_total_flops()
            self.counter = None
        else:
            self.current["step_seconds"].append(now - self.last)
            self.current["step_cpu_seconds"].append(now_cpu - self.last_cpu)
        run.after_step(record)
        if self.count_flops and record.step == record.total_steps - 1:
            from torch.utils.flop_counter import FlopCounterMode

            self.counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
            self.counter.__enter__()
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def on_phase_end(self, run, phase):
        self.current["peak_memory_bytes"] = peak_memory(run.device)


class BenchmarkPlugin:
    """Registered in code next to the built-ins: the meter, and the harness's optimizers."""

    def __init__(self, meter: Meter):
        self.meter = meter

    @bas.hookimpl
    def bas_register_observers(self, register):
        register("benchmark-meter", lambda config: self.meter, description="step times, peak memory, FLOPs")

    @bas.hookimpl
    def bas_register_optimizers(self, register):
        register("adamw-reference", adamw_reference, description="AdamW as the reference code runs it")
        register("adamw-fused", adamw_fused, description="AdamW with fused kernels on any device")


# -- the run with the knobs the product does not have ------------------------------------------
class EncodedEachStep:
    """Stands in for a cached latent distribution (mean, std): taking a slice of ``mean`` runs the
    VAE encoder on those images, as the reference code does every step; the matching slice of
    ``std`` (read next, by the same expression) returns the std of that same encoding."""

    def __init__(self, run: Run, images: torch.Tensor):
        self.run, self.images, self.last_std = run, images, None
        self.mean, self.std = _Mean(self), _Std(self)


class _Mean:
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source.images)

    def __getitem__(self, index):
        mean, self.source.last_std = self.source.run.encode_images(self.source.images[index])
        return mean


class _Std(_Mean):
    def __getitem__(self, index):
        return self.source.last_std


class BenchRun(Run):
    def __init__(self, config, plugins, variant: Variant):
        super().__init__(config, plugins)
        self.variant = variant
        self.kept_rows = None
        self.trainable: dict[str, int] = {}
        self.class_images: torch.Tensor | None = None  # (N, 3, R, R) in [-1, 1], for the prior term

    def load(self) -> None:
        super().load()
        c, v = self.components, self.variant
        if not v.fused_attention:
            from diffusers.models.attention_processor import AttnProcessor

            c.denoiser.set_attn_processor(AttnProcessor())
            for encoder in c.text_encoders:
                encoder.model.set_attn_implementation("eager")
        if v.channels_last:
            c.denoiser.to(memory_format=torch.channels_last)
        if v.compile:
            c.denoiser.compile(dynamic=False)  # with dynamic shapes inductor fails on this UNet (torch 2.13)
        if not v.cached_latents:
            image = self.scene.image.unsqueeze(0)
            encoded = EncodedEachStep(self, torch.cat([image, image.flip(-1)]))
            self.latent_mean, self.latent_std = encoded.mean, encoded.std

    def before_training(self) -> None:
        """After the loss terms' setup: the class images encoded at every step, the prior loss in phase 1."""
        for term in self.resolved.loss_terms:
            if term.name != "prior":
                continue
            if self.variant.prior_in_phase1:
                term.phases = (1, 2)
            if not self.variant.cached_latents:
                encoded = EncodedEachStep(self, self.class_images)
                term.mean, term.std = encoded.mean, encoded.std

    def run_phase(self, phase, steps, groups) -> None:
        c, v = self.components, self.variant
        extra, frozen = [], []
        if not v.handle_rows_only:
            matrices = [e.base.weight for e in self.handle_embeddings]
            for matrix in matrices:
                matrix.requires_grad_(True)
            extra += matrices
            self.kept_rows = [m.detach().clone() for m in matrices] if phase == 1 else None
        if phase == 1 and not v.skip_frozen_grads:
            frozen = [p for m in c.trainable_modules().values() for p in m.parameters() if not p.requires_grad]
            for p in frozen:
                p.requires_grad_(True)
        self.trainable[f"phase{phase}"] = sum(p.numel() for g in groups for p in g["params"]) + sum(p.numel() for p in extra)
        groups = [dict(groups[0], params=groups[0]["params"] + extra), *groups[1:]]  # the matrix trains at the first group's rate
        try:
            super().run_phase(phase, steps, groups)
        finally:
            for p in frozen:
                p.requires_grad_(False)
                p.grad = None

    def after_step(self, record) -> None:
        if self.kept_rows is not None and record.phase == 1:  # the reference restores the old rows
            with torch.no_grad():
                for embedding, rows in zip(self.handle_embeddings, self.kept_rows):
                    embedding.base.weight.copy_(rows)


# -- one measurement -----------------------------------------------------------------------------
def write_class_images(directory: Path, count: int, size: int, seed: int) -> torch.Tensor:
    """Pre-made class images (noise: their content does not change the cost); returns them as (N, 3, R, R) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(directory / f"class-{i:04d}.png")
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").exists() else "CPU"
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads > 1 else ''}"


def summarize_phase(data: dict, warmup: int, paper_steps: int) -> dict:
    seconds = data["step_seconds"]
    warm, timed = seconds[:warmup], seconds[warmup:]
    median = statistics.median(timed)
    flops = data.get("flops_per_step")
    return {
        "s_per_step": median,
        "cpu_s_per_step": statistics.median(data["step_cpu_seconds"][warmup:]),
        "step_seconds": seconds,
        "step_cpu_seconds": data["step_cpu_seconds"],
        "warmup_steps": len(warm),
        "timed_steps": len(timed),
        "projected_s": sum(warm) + (paper_steps - len(warm)) * median,
        "peak_memory_bytes": data["peak_memory_bytes"],
        "flops_per_step": flops,
        "tflops": flops / median / 1e12 if flops else None,
        "trainable_params": data["trainable_params"],
    }


def measure(spec: dict) -> dict:
    """Run one configuration for ``warmup + timed + 1`` steps per phase and summarize it."""
    from bas.core.api import make_config, run_plugins
    from bas.demo.demo import draw_scene
    from bas.core.plugins import Plugins

    variant = Variant(**spec["variant"])
    work, res, warmup = Path(spec["workdir"]), spec["resolution"], spec["warmup"]
    steps = warmup + spec["timed"] + 1  # the last step of each phase is the one whose FLOPs are counted
    scene = draw_scene(work / "scene", size=res)
    names = [variant.strategy] + (["prior-preservation"] if variant.prior_preservation else []) + list(spec.get("plugins", ()))
    meter = Meter(warmup, count_flops=not variant.compile)  # the counter's dispatch mode would recompile
    values = dict(
        out=work / "out", image=scene / "img.png", masks=[scene / "mask0.png", scene / "mask1.png"], model=spec["model"],
        phase1_steps=steps, phase2_steps=steps, precision=variant.precision, optimizer=variant.optimizer,
        gradient_checkpointing=variant.gradient_checkpointing, quantize=variant.quantize, resolution=res, seed=spec["seed"], device=spec["device"],
        quiet=True,
    )
    plugins = run_plugins(Plugins(names, extra=[("benchmark", BenchmarkPlugin(meter))]), values, names)  # as bas run turns them on
    class_images = None
    if variant.prior_preservation:
        n = spec["num_class_images"]
        class_images = write_class_images(work / "class_images", n, res, spec["seed"])
        values.update(class_data_dir=work / "class_images", num_class_images=n)
    config = make_config(plugins, values, names)

    t0 = time.perf_counter()
    run = BenchRun(config, plugins, variant)
    run.class_images = class_images
    run.check_out()  # locks --out; the run works in its staging folder
    try:
        run.load()
        t_train = time.perf_counter()
        run.train()
        t_save = time.perf_counter()
        run.times["total_s"] = t_save - t0
        run.save()
        total_s = time.perf_counter() - t0
    finally:
        run.folder.close()
    # around the step loops: loss-term setup (class image latents), adapters, observers at the phases' ends
    around = (t_save - t_train) - run.times["phase1_s"] - run.times["phase2_s"]
    times = dict(run.times, train_around_steps_s=around, save_s=total_s - (t_save - t0))

    for phase, data in meter.phases.items():
        data["trainable_params"] = run.trainable[phase]
    phases = {name: summarize_phase(meter.phases[name], warmup, paper) for name, paper in zip(("phase1", "phase2"), PAPER_STEPS)}
    overhead = total_s - run.times["phase1_s"] - run.times["phase2_s"]
    training = sum(p["projected_s"] for p in phases.values())
    flops = [p["flops_per_step"] for p in phases.values()]
    return {
        "settings": asdict(variant),
        "precision": run.precision,
        "plugins": sorted(run.plugins.infos),
        "phases": phases,
        "peak_memory_bytes": max(p["peak_memory_bytes"] for p in phases.values()),
        "memory_kind": "cuda_max_allocated" if run.device.type == "cuda" else "peak_rss",
        "process_peak_rss_bytes": peak_rss_since_start(),
        "overhead_s": overhead,
        "times": times,
        "projected_training_s": training,
        "projected_extraction_s": overhead + training,
        "flops_per_extraction": sum(f * n for f, n in zip(flops, PAPER_STEPS)) if all(flops) else None,
        "device": str(run.device),
        "device_name": device_name(run.device),
        "torch": torch.__version__,
    }


SPEC_FIELDS = {"variant": dict, "workdir": str, "model": str, "resolution": int, "warmup": int, "timed": int, "seed": int, "device": str}


def load_spec(path: Path) -> dict:
    """A measurement's spec as :func:`benchmarks.extract.run_worker` writes it, checked, or one clear error."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        problem = str(exc)
    else:
        problem = spec_problem(spec)
    if problem:
        raise click.ClickException(f"{path} is not a measurement spec ({problem}); run benchmarks/extract.py, which writes one per "
                                   f"configuration and runs this on it.")
    return spec


def spec_problem(spec) -> str | None:
    if not isinstance(spec, dict):
        return f"it holds {json_kind(spec)}, not an object"
    wrong = [k for k, kind in SPEC_FIELDS.items() if not isinstance(spec.get(k), kind) or isinstance(spec.get(k), bool)]
    if wrong:
        return f"no {', '.join(wrong)} of the right kind"
    unknown = set(spec["variant"]) - set(Variant.__dataclass_fields__)
    if unknown:
        return f"its variant has unknown settings {', '.join(sorted(unknown))}"
    if spec["variant"].get("prior_preservation", True) and not isinstance(spec.get("num_class_images"), int):
        return "no num_class_images for its prior preservation"
    if spec.get("threads") is not None and not (isinstance(spec["threads"], int) and spec["threads"] > 0):
        return f"threads {spec['threads']!r} is not a positive whole number"
    if not (isinstance(spec.get("plugins", []), list) and all(isinstance(p, str) for p in spec.get("plugins", []))):
        return "its plugins are not a list of names"
    return None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def main(spec: Path, out: Path) -> None:
    """Measure the configuration SPEC (JSON, as benchmarks/extract.py writes it) and write its result to OUT.

    A spec or OUT it cannot use is one Error line; a failure of the measurement keeps its traceback, whose last
    line benchmarks/extract.py records for the configuration.
    """
    from bas.core import io

    with one_line():
        data = load_spec(spec)
        io.check_output_file(out, "OUT")  # before the measurement, not after it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if data.get("threads"):
        torch.set_num_threads(data["threads"])
    result = measure(data)
    io.write_text(out, json.dumps(result, indent=2) + "\n")  # whole or not at all: run_worker reads it once it is there


if __name__ == "__main__":
    main()
