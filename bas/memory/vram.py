"""``--vram N``: the settings that make a run fit N GB, chosen by the memory plan.

Starting from the run's options with bas's plain defaults where the user chose none (no gradient
checkpointing, AdamW, unquantised weights, LoRA rank 8), each step below adds one saving, in this
order, and the first set whose predicted peak fits ``N`` GB less a headroom is used:

1. gradient checkpointing (activations recomputed in the backward pass);
2. 8-bit AdamW (bitsandbytes, CUDA);
3. int8, then nf4 base weights, where the family loads them (FLUX.1; LoRA only, CUDA);
4. a smaller LoRA rank: 4, 2, 1.

Caching the text encoders' outputs is not among them: every text encoder holds the handles' trainable
rows, so its output changes every step.  An option given on the command line is never changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from bas.core.errors import BasError
from bas.core.plugins import Plugins
from bas.core.training import RunConfig
from bas.memory.plan import Plan, make_plan, planned_device

GIB = 2**30
HEADROOM = int(0.75 * GIB)  # the CUDA context and the caching allocator's slack, beyond max_memory_allocated
RANKS = (4, 2, 1)


@dataclass
class Choice:
    config: RunConfig
    plan: Plan
    chose: list[str]  # the options chosen, as command-line flags


def candidates(config: RunConfig, plugins: Plugins, explicit: set[str]):
    """``(config, flags)`` in the documented order, each with one more saving than the one before."""
    from bas.core.family import choose_family
    from bas.core.model import resolve_model
    from bas.memory.meta import PACKAGED, packaged_folder

    device = planned_device(config.device)
    model = config.model
    family = choose_family(
        plugins, str(packaged_folder(model)) if model in PACKAGED else resolve_model(model, plugins) if model else None, config.family
    )
    strategy = plugins.choose("weight strategy").name
    base = {}
    for name, plain in (("gradient_checkpointing", False), ("optimizer", "adamw"), ("quantize", "none")):
        if name not in explicit:
            base[name] = plain
    options = dict(config.options)
    current = replace(config, **base, options=options)
    flags: list[str] = []
    yield current, list(flags)
    steps = []
    if "gradient_checkpointing" not in explicit:
        steps.append(({"gradient_checkpointing": True}, {}, "--gradient-checkpointing"))
    if "optimizer" not in explicit and device.type == "cuda":
        steps.append(({"optimizer": "adamw8bit"}, {}, "--optimizer adamw8bit"))
    if "quantize" not in explicit and device.type == "cuda" and strategy != "full":
        for q in ("int8", "nf4"):
            if q in family.quantizations:
                steps.append(({"quantize": q}, {}, f"--quantize {q}"))
    if "lora_rank" not in explicit and strategy == "lora":
        for rank in RANKS:
            if rank < options.get("lora_rank", 8):
                steps.append(({}, {"lora_rank": rank}, f"--lora-rank {rank}"))
    for fields, option_values, flag in steps:
        current = replace(current, **fields, options={**current.options, **option_values})
        flags = [f for f in flags if f.split()[0] != flag.split()[0]] + [flag]
        yield current, list(flags)


_PLANS: dict[str, Plan] = {}  # plans already made in this process, by their run's options


def plan_of(config: RunConfig, plugins: Plugins) -> Plan:
    key = json.dumps(config.to_json(), sort_keys=True, default=str)
    if key not in _PLANS:
        _PLANS[key] = make_plan(config, plugins)
    return _PLANS[key]


def fit(config: RunConfig, plugins: Plugins, vram_gb: float, explicit: set[str] = frozenset()) -> Choice:
    """The first settings in the documented order whose plan fits ``vram_gb``; an error naming the
    smallest budget that works when none does.

    Each saving lowers the peak, so the plans are searched by bisection: the cheapest settings first
    (if they do not fit, nothing does), then the plain ones, then halves of the rest.
    """
    if not vram_gb > 0:
        raise BasError(f"--vram must be a positive number of GB (such as 12), not {vram_gb}.")
    budget = vram_gb * GIB - HEADROOM
    options = list(candidates(config, plugins, set(explicit)))

    def fits(i: int) -> bool:
        return plan_of(options[i][0], plugins).peak <= budget

    last = len(options) - 1
    if not fits(last):
        plan, flags = plan_of(options[last][0], plugins), options[last][1]
        needed = -(-(plan.peak + HEADROOM) // GIB)
        cheapest = ", ".join(flags) if flags else "your options as given"
        raise BasError(
            f"Nothing bas can choose fits this run in {vram_gb:g} GB: the cheapest settings ({cheapest}) need a predicted "
            f"{plan.peak / GIB:.1f} GB plus {HEADROOM / GIB:.2f} GB headroom; use --vram {needed} or more, or a lower --resolution."
        )
    low, high = 0, last  # the first that fits is in [low, high]
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    candidate, flags = options[low]
    return Choice(candidate, plan_of(candidate, plugins), flags)


def describe(choice: Choice, vram_gb: float) -> str:
    chose = " ".join(choice.chose) if choice.chose else "nothing beyond your options"
    return (
        f"--vram {vram_gb:g}: chose {chose}; predicted peak {choice.plan.peak / GIB:.2f} GB "
        f"(+{HEADROOM / GIB:.2f} GB headroom for the CUDA context and allocator)."
    )
