"""The rule that picks bas-mini's operating point from a tuning run, as benchmarks/README.md declared it.

``python -m benchmarks.tuning_rule RESULT.json [--group full,...]`` prints each setting's means over
the tuning scenes and the one the rule takes among the group's settings (``--group``, cheapest
first, the group's default first: in a later group, the setting the earlier groups chose):

* among the settings with leakage <= 0.05 and count >= 0.9, the highest mean of identity and
  composition;
* a setting within 0.02 of that best loses to a cheaper one.

If no setting meets both bounds (the declaration did not foresee it), the bounds become "no worse
than the group's default by more than 0.02 on leakage and count", and the output says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from benchmarks.commandline import Command, json_kind

LEAKAGE_MAX, COUNT_MIN, TIE = 0.05, 0.9, 0.02


RULE_METRICS = ("identity", "composition", "leakage", "count")  # what the rule and its table read of every setting


def means(result: dict) -> dict[str, dict[str, float]]:
    """Each setting's mean of each metric over the result's scenes and seeds."""
    return {name: {m: cell["value"]["mean"] for m, cell in stats.items() if "value" in cell} for name, stats in result["stats"].items()}


def stats_problem(stats: dict) -> str | None:
    """What is wrong with a result's ``stats`` for the rule (each setting an object of metric cells, each cell's
    ``value.mean`` a number, the rule's metrics all there), or None."""
    if not stats:
        return "its stats hold no setting"
    for name, cells in stats.items():
        if not isinstance(cells, dict):
            return f"the stats of {name!r} are {json_kind(cells)}, not an object of metrics"
        for metric, cell in cells.items():
            if not isinstance(cell, dict):
                return f"the stats of {name!r} give {metric} as {json_kind(cell)}, not an object"
            if "value" in cell:
                mean = cell["value"].get("mean") if isinstance(cell["value"], dict) else None
                if not isinstance(mean, (int, float)) or isinstance(mean, bool):
                    return f"the stats of {name!r} give {metric}'s mean as {mean!r}, not a number"
        missing = [m for m in RULE_METRICS if "value" not in cells.get(m, {})]
        if missing:
            return f"the stats of {name!r} have no mean of {', '.join(missing)}"
    return None


def choose(table: dict[str, dict[str, float]], group: list[str]) -> tuple[str, str]:
    """The setting the rule takes among ``group`` (cheapest first, its default first) and a sentence saying how."""
    table = {n: table[n] for n in group}
    baseline = group[0]
    score = {n: (v["identity"] + v["composition"]) / 2 for n, v in table.items()}
    eligible = [n for n, v in table.items() if v["leakage"] <= LEAKAGE_MAX and v["count"] >= COUNT_MIN]
    how = f"leakage <= {LEAKAGE_MAX} and count >= {COUNT_MIN}"
    if not eligible:
        base = table[baseline]
        eligible = [n for n, v in table.items() if v["leakage"] <= base["leakage"] + TIE and v["count"] >= base["count"] - TIE]
        how = (
            f"no setting has {how}, so the bounds are 'no worse than {baseline} by more than {TIE}' "
            f"(leakage <= {base['leakage'] + TIE:.3f}, count >= {base['count'] - TIE:.3f})"
        )
    best = max(score[n] for n in eligible)
    near = [n for n in eligible if score[n] >= best - TIE]
    chosen = min(near, key=group.index)
    return chosen, (
        f"{how}: {', '.join(sorted(eligible))}; best mean(identity, composition) {best:.3f}; within {TIE}: "
        f"{', '.join(sorted(near))}; the cheapest of those: {chosen}"
    )


@click.command(cls=Command)
@click.argument("result", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--group", default="", help="The group's settings, cheapest first, its default first [default: full, then the file's order].")
def main(result, group):
    """Apply the declared operating-point rule to a tuning result."""
    try:
        data = json.loads(result.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{result} is not a readable result file ({exc}); give the JSON benchmarks.fidelity wrote.") from None
    if not isinstance(data, dict) or not isinstance(data.get("stats"), dict):
        raise click.ClickException(f"{result} holds no fidelity statistics; give the JSON benchmarks.fidelity wrote.")
    scene_set = data.get("scene_set") or {}
    if not isinstance(scene_set, dict):
        raise click.ClickException(f"{result}'s scene_set is {json_kind(scene_set)}, not a record; give the JSON benchmarks.fidelity wrote.")
    if scene_set.get("name") != "tuning":
        raise click.ClickException(f"{result} was not run on the tuning scenes.")
    problem = stats_problem(data["stats"])
    if problem:
        raise click.ClickException(f"{result} is not a result benchmarks.fidelity wrote ({problem}); give the JSON it wrote, as it wrote it.")
    table = means(data)
    click.echo("| setting | identity | composition | mean | leakage | count | swap |")
    click.echo("|---|---|---|---|---|---|---|")
    for n, v in table.items():
        click.echo(
            f"| {n} | {v['identity']:.3f} | {v['composition']:.3f} | {(v['identity'] + v['composition']) / 2:.3f} | "
            f"{v['leakage']:.3f} | {v['count']:.3f} | {v.get('swap', float('nan')):.3f} |"
        )
    names = [g for g in group.split(",") if g] or ["full"] + [n for n in table if n != "full"]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise click.ClickException(f"{result} has no setting {', '.join(unknown)}; it has {', '.join(table)}.")
    chosen, how = choose(table, names)
    click.echo(f"\nThe rule takes {chosen}: {how}.")


if __name__ == "__main__":
    main()
