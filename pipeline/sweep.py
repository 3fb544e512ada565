"""The candidates x iterations grid behind the paper's Figure 4 (`selfprog-cli sweep`).

Each cell is one run, launched one after another on this installation; cells of the
same sweep name that already completed are reused, so running a sweep again resumes it.
"""
from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any, Callable

from pipeline.catalog import get_task
from pipeline.proposers import names as arm_names
from pipeline.report import arm_outcomes
from pipeline.settings import ConfigError, Settings, preset as build_preset
from pipeline.store import LineageStore


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{what} expects positive integers, got {text!r}")
    return sorted(set(values))


def sweep_cells(store: LineageStore, name: str) -> dict[tuple[int, int], Any]:
    """The newest run of each (candidates, iterations) cell of a sweep."""
    cells: dict[tuple[int, int], Any] = {}
    for run in store.list_runs(100_000):          # newest first
        cfg = run.config or {}
        if cfg.get("sweep") == name:
            cells.setdefault((int(cfg["candidates"]), int(cfg["iterations"])), run)
    return cells


@dataclasses.dataclass
class Sweep:
    name: str
    task: str
    configs: dict[tuple[int, int], Any]    # (candidates, iterations) -> RunConfig


def plan(task: str, grid_n: list[int], grid_it: list[int], preset_name: str,
         overrides: dict[str, Any], name: str | None, *, no_launch: bool = False) -> Sweep:
    """Every cell's configuration, checked up front."""
    try:
        spec = get_task(task)
    except (ValueError, LookupError) as e:
        raise ConfigError(str(e)) from None
    if spec.self_programming:
        raise ConfigError("sweep is for vision tasks (it plots accuracy); pick --task")
    if name is None:
        if no_launch:
            raise ConfigError("--no-launch needs the --name of an existing sweep")
        name = f"{task}-{uuid.uuid4().hex[:8]}"
    configs = {(n, it): build_preset(preset_name, **{**overrides, "task": task, "candidates": n,
                                                     "iterations": it, "sweep": name})
               for n in grid_n for it in grid_it}
    return Sweep(name, task, configs)


def run(settings: Settings, sweep: Sweep, *, no_launch: bool = False,
        say: Callable[[str], None] = lambda line: None,
        progress: Callable[[str, str, dict], None] | None = None) -> list[dict[str, Any]]:
    """Launch the cells not completed yet (none with `no_launch`); one row per cell."""
    from pipeline.runs import launch   # heavy (torch): only when a sweep runs

    with LineageStore(settings.database_url, create=True) as store:
        done = {k: r for k, r in sweep_cells(store, sweep.name).items()
                if r.status == "completed"}
    for number, (key, config) in enumerate(sweep.configs.items(), 1):
        label = (f"[sweep {sweep.name} {number}/{len(sweep.configs)}] "
                 f"candidates={key[0]} iterations={key[1]}")
        if key in done:
            say(f"{label}: reusing completed run {done[key].id}")
            continue
        if no_launch:
            continue
        say(f"{label}: launching")

        def relay(event: str, info: dict[str, Any], label: str = label) -> None:
            if progress is not None:
                progress(label, event, info)

        launch(settings, config, progress=relay)
    return rows(settings, sweep)


def rows(settings: Settings, sweep: Sweep) -> list[dict[str, Any]]:
    out = []
    with LineageStore(settings.database_url) as store:
        cells = sweep_cells(store, sweep.name)
        for key in sweep.configs:
            run = cells.get(key)
            o = arm_outcomes(store.iterations(run.id), store.candidates(run.id)) if run else {}
            out.append({"candidates": key[0], "iterations": key[1], "total": key[0] * key[1],
                        "run_id": run.id if run else None,
                        "status": run.status if run else "missing",
                        "start": next((v["start"] for v in o.values()), None),
                        # the end score of every registered arm (None where it did not run)
                        **{arm: o.get(arm, {}).get("end") for arm in arm_names()}})
    return out


def figure(settings: Settings, sweep: Sweep, cells: list[dict[str, Any]],
           out_path: Path | None) -> Path:
    from pipeline import plots   # matplotlib is slow to import
    out = out_path if out_path is not None else settings.artifacts / "sweeps" / f"{sweep.name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    return plots.plot_sweep(sweep.task, [r for r in cells if r["status"] == "completed"], out)
