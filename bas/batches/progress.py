"""What ``bas batch`` shows while it runs: one bar over the scenes (done, running, failed, ETA)
and, on a terminal, a line per running scene with its phase and step.  Off a terminal (a log
file, CI) it writes one line per scene started, per phase and per scene finished instead of
redrawing bars, and after each finished scene the bar as a line: the counts and the ETA."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

MAX_SCENE_BARS = 8  # running scenes beyond these are counted in the main bar only
clock = time.monotonic  # the ETA's clock (tests set their own)


class BatchProgress:
    def __init__(self, total: int, skipped: int = 0, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bars = not quiet and self.stream.isatty()
        self.total = total
        self.done = self.failed = 0
        self.running: dict[str, tqdm | None] = {}
        self.free_slots = list(range(1, MAX_SCENE_BARS + 1))
        self.slots: dict[str, int] = {}
        self.phases: dict[str, int] = {}
        self.main = None
        self.started_at = clock()
        if self.bars:
            self.main = tqdm(total=total, desc="scenes", unit="scene", file=self.stream, dynamic_ncols=True, position=0)
            self._refresh()
        elif not quiet:
            extra = f" ({skipped} finished earlier, skipped)" if skipped else ""
            self.write(f"Running {total} scene(s){extra}.")

    def write(self, line: str) -> None:
        if self.quiet:
            return
        if self.bars:
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def note(self, line: str) -> None:
        self.write(line)

    def counts(self) -> str:
        return f"{self.done} done, {len(self.running)} running, {self.failed} failed"

    def tally(self) -> str:
        """The main bar as one line: ``scenes 1/3: 1 done, 2 running, 0 failed; 00:10 elapsed, ETA 00:20``
        (the ETA from the rate at which scenes finished so far, as tqdm computes it)."""
        finished = self.done + self.failed
        elapsed = max(clock() - self.started_at, 0.0)
        line = f"scenes {finished}/{self.total}: {self.counts()}; {tqdm.format_interval(elapsed)} elapsed"
        if finished < self.total:
            eta = tqdm.format_interval(elapsed / finished * (self.total - finished)) if finished else "?"
            line += f", ETA {eta}"
        return line

    def _refresh(self) -> None:
        if self.main is not None:
            self.main.set_postfix_str(self.counts(), refresh=True)

    def _drop_bar(self, name: str) -> None:
        bar = self.running.pop(name, None)
        if bar is not None:
            bar.close()
            self.free_slots.append(self.slots.pop(name))
            self.free_slots.sort()

    def started(self, name: str, attempt: int = 1) -> None:
        again = f" (attempt {attempt})" if attempt > 1 else ""
        self._drop_bar(name)  # a retried scene starts again: its earlier bar goes
        if not self.bars:
            self.write(f"{name}: started{again}")
            self.running[name] = None
            return
        bar = None
        if self.free_slots:
            slot = self.free_slots.pop(0)
            self.slots[name] = slot
            bar = tqdm(total=0, desc=f"  {name}: loading{again}", unit="step", file=self.stream, dynamic_ncols=True, position=slot, leave=False)
        self.running[name] = bar
        self._refresh()

    def update(self, name: str, phase: int, step: int, total: int) -> None:
        if name not in self.running:
            return
        if not self.bars:
            if phase and self.phases.get(name) != phase:
                self.phases[name] = phase
                self.write(f"{name}: phase {phase}, {total} steps" + (f", from step {step}" if step else ""))
            return
        bar = self.running[name]
        if bar is None:
            return
        label = f"  {name}: phase {phase}" if phase else f"  {name}: loading"
        if bar.total != total or bar.desc != label:
            bar.reset(total=total)
            bar.set_description_str(label, refresh=False)
        bar.n = step
        bar.refresh()

    def finished(self, name: str, status: str, error: str | None = None, seconds: float | None = None) -> None:
        self._drop_bar(name)
        if status == "done":
            self.done += 1
        else:
            self.failed += 1
        took = f" in {seconds:.1f} s" if seconds else ""
        self.write(f"{name}: {status}{took}" + (f": {error}" if error and status != "done" else ""))
        if self.main is not None:
            self.main.update(1)
            self._refresh()
        else:
            self.write(self.tally())

    def close(self) -> None:
        for bar in self.running.values():
            if bar is not None:
                bar.close()
        self.running.clear()
        if self.main is not None:
            self.main.close()
