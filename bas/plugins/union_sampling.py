"""Union sampling: each step shows a random subset of the concepts, in random order (the paper's §3.3)."""

from __future__ import annotations

import random

from bas import hookimpl


def union_sampler(config, num_concepts: int):
    def sample(rng: random.Random) -> list[int]:
        k = rng.randint(1, num_concepts)
        return rng.sample(range(num_concepts), k)

    return sample


@hookimpl
def bas_register_samplers(register):
    register("union", union_sampler, description="random non-empty subset of concepts per step, random order")
