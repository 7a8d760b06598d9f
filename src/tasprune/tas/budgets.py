"""The budgets of a search (FLOPs, parameters, latency) from its settings, checked against
the smallest shape of the search space."""

from __future__ import annotations

import math
import sys

from torch import nn

from tasprune.latency_table import Key, LatencyTable
from tasprune.net.plan import LayerPlan, PlanShape
from tasprune.settings import SearchConfig
from tasprune.tas.cost import Budget, flops_budget, params_budget
from tasprune.tas.space import SearchSpace


def check_budget(space: SearchSpace, flops_ratio: float) -> None:
    """Refuse a budget the space cannot reach, naming the reachable range."""
    low = space.min_flops_ratio()
    if not (0 < flops_ratio <= 1) or flops_ratio < low:
        raise ValueError(
            f"flops ratio {flops_ratio} cannot be reached: the smallest shape of this search "
            f"space (every conv at its narrowest width, every stage at its fewest blocks) has "
            f"{low:.4f} of the unpruned FLOPs; choose a ratio in [{math.ceil(low * 1e4) / 1e4}"
            f", 1]"
        )


def describe_budgets(config: SearchConfig) -> str:
    """The budgets of a search config in words, e.g. "0.5 of the FLOPs"."""
    parts = []
    if config.flops_ratio is not None:
        parts.append(f"{config.flops_ratio} of the FLOPs")
    if config.params_ratio is not None:
        parts.append(f"{config.params_ratio} of the parameters")
    if config.latency_ratio is not None:
        batches = ", ".join(str(b) for b in config.latency_batch_sizes)
        parts.append(f"{config.latency_ratio} of the {config.latency_device} latency (batch "
                     f"{batches})")
    return " and ".join(parts)


def space_of(config: SearchConfig, plan: LayerPlan) -> SearchSpace:
    """The search space a config searches on a network's plan (traced with free shortcuts
    unless `config.couple_residual`)."""
    if plan.free == config.couple_residual:
        raise ValueError("the plan was traced for another search space than the config's "
                         "couple_residual asks for (trace with free_shortcuts="
                         f"{not config.couple_residual})")
    return SearchSpace.from_plan(plan, config.width_ratios, config.channel_multiple)


def latency_budget(full: PlanShape, ratio: float, table: LatencyTable) -> Budget:
    """A latency budget priced by a latency table (at its batch)."""
    return Budget(f"latency@{table.batch}", ratio, table.predict(full), table.predict,
                  table.expected)


def _check_table(table: LatencyTable, keys: set[Key], model: nn.Module, full: PlanShape,
                 quiet: bool) -> None:
    """Set a freshly timed table's prediction for the unpruned network beside the network's
    own time; time the table's entries of this network again when they are more than 2x
    apart (the machine was busy while it was timed)."""
    predicted, measured = table.check(model, full)
    if not 0.5 <= measured / predicted <= 2:
        if not quiet:
            print(f"latency table: it predicts {predicted:.2f} ms for the unpruned network at "
                  f"batch {table.batch}, which runs in {measured:.2f} ms; timing it again "
                  "(was the machine busy?)", file=sys.stderr, flush=True)
        table.forget(keys)
        table.fill(keys)
        predicted, measured = table.check(model, full)
    if not quiet:
        print(f"latency table: batch {table.batch}: {predicted:.2f} ms predicted for the "
              f"unpruned network, {measured:.2f} ms measured", file=sys.stderr, flush=True)


def build_budgets(config: SearchConfig, space: SearchSpace, quiet: bool = True,
                  model: nn.Module | None = None) -> tuple[Budget, ...]:
    """The budgets of `config` on `space`, latency tables timed (or read from the cache)
    first (and, when freshly timed, checked against `model`, the unpruned network, when
    given); each is checked against the smallest shape of the space."""
    full = space.full
    budgets = []
    if config.flops_ratio is not None:
        budgets.append(flops_budget(full, config.flops_ratio))
    if config.params_ratio is not None:
        budgets.append(params_budget(full, config.params_ratio))
    if config.latency_ratio is not None:
        for batch in config.latency_batch_sizes:
            table = LatencyTable.cached(batch, config.latency_device, config.latency_threads)
            if table.dropped and not quiet:
                print(f"latency table: {table.dropped} damaged entries of {table.path} are "
                      "timed again", file=sys.stderr, flush=True)
            keys = table.keys_of_space(space)
            todo = len(keys - table.entries.keys())
            if todo and not quiet:
                print(f"latency table: timing {todo} layer configurations at batch {batch} on "
                      f"{config.latency_device} ({table.threads} threads; cached in "
                      f"{table.path})", file=sys.stderr, flush=True)
            if table.fill(keys) and model is not None:  # just timed: is it right?
                _check_table(table, keys, model, full, quiet)
            budgets.append(latency_budget(full, config.latency_ratio, table))
    smallest = space.smallest()
    for b in budgets:
        low = b.fraction(smallest)
        if b.ratio < low:
            name = b.name.split("@")[0]
            raise ValueError(
                f"{name} ratio {b.ratio} cannot be reached: the smallest shape of this search "
                f"space (every conv at its narrowest width, every stage at its fewest blocks) "
                f"has {low:.4f} of the unpruned network's {b.name}; choose a ratio in "
                f"[{math.ceil(low * 1e4) / 1e4}, 1]")
    return tuple(budgets)
