"""The run report: `report.md` and PNG plots made from a run directory's files.

Reads what the phases wrote (`shape.json`, `metrics.jsonl`, `summary.json`,
`teacher/metrics.jsonl`) and draws, headless (matplotlib figures drawn by Agg, no pyplot: the
process's matplotlib backend is left alone):

* widths.png   - searched width of every conv against the full width;
* blocks.png   - blocks kept per stage against the full depth;
* flops.png    - expected and argmax FLOPs over the search, with the target band;
* accuracy.png - accuracy curves of search and training (and the teacher);
* tau.png      - Gumbel temperature and mean distribution entropy over the search.

Plots whose data is missing (e.g. a baseline run has no search) are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tasprune._io import atomic_write_text, read_json, read_jsonl
from tasprune.export import read_shape
from tasprune.net.plan import PlanShape

REPORT_FILE = "report.md"


def _records(path: Path, phase: str) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [r for r in read_jsonl(path) if r.get("phase") == phase]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None and "epoch" in r]
    return [p[0] for p in points], [p[1] for p in points]


def _figure(figsize: tuple[float, float], **grid: Any) -> tuple[Any, Any]:
    """A figure of its own (no pyplot state) and its axes; matplotlib loads only here."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(**grid)


def _save(fig: Any, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if "epoch" in ax.get_xlabel():
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # a figure without pyplot draws with Agg for PNG


def plot_widths(shape: PlanShape, path: Path) -> None:
    """Bars: full width (light) and searched width (dark) of every searched channel
    group (named after the first layer writing it)."""
    plan = shape.plan
    full = [plan.groups[g].size for g in plan.searched]
    used = shape.used_groups()
    labels = [plan.groups[g].name.removesuffix(".weight") for g in plan.searched]
    x = list(range(len(full)))
    fig, ax = _figure((max(6.0, 0.18 * len(full) + 2), 4.2))
    ax.bar(x, full, color="#d0d7e2", label="full network", width=0.85)
    ax.bar([i for i in x if i in used], [shape.widths[i] for i in x if i in used],
           color="#2b6cb0", label="searched (kept)", width=0.85)
    dropped = [i for i in x if i not in used]
    if dropped:
        ax.bar(dropped, [shape.widths[i] for i in dropped], color="#e2a3a3", width=0.85,
               label="in a dropped block")
    step = max(1, len(full) // 40)
    ax.set_xticks(x[::step])
    ax.set_xticklabels(labels[::step], rotation=90, fontsize=6)
    ax.set_xlabel("channel group (first layer writing it)")
    ax.set_ylabel("channels")
    ax.set_title("Width of every channel group: searched vs full")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_blocks(shape: PlanShape, path: Path) -> None:
    plan = shape.plan
    stages = [plan.stage_name(s) for s in range(len(plan.stages))]
    depths = [len(s) + 1 for s in plan.stages]
    fig, ax = _figure((max(4.5, 1.2 * len(stages) + 1), 3.4))
    if not stages:
        ax.text(0.5, 0.5, "no stage of skippable blocks", ha="center", va="center")
        ax.set_axis_off()
        _save(fig, path)
        return
    ax.bar(stages, depths, color="#d0d7e2", label="full network")
    ax.bar(stages, shape.blocks, color="#2b6cb0", width=0.5, label="kept")
    for i, (b, d) in enumerate(zip(shape.blocks, depths, strict=True)):
        ax.text(i, b, f"{b}/{d}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 1.35 * max(depths))  # room for the legend above the bars
    ax.set_ylabel("blocks")
    ax.set_title("Blocks kept per stage")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_flops(search: list[dict[str, Any]], derive: dict[str, Any] | None, path: Path) -> None:
    fig, ax = _figure((6, 3.6))
    for key, label, style in (("expected_ratio", "expected FLOPs", "--"),
                              ("flops_ratio", "argmax shape FLOPs", "-")):
        xs, ys = _series(search, key)
        ax.plot(xs, ys, style, marker="o", markersize=3, label=label)
    target = search[-1].get("target_ratio") if search else None
    tol = (derive or {}).get("tolerance", 0.05)
    if target is not None:
        ax.axhspan(target - tol, target, color="#9ae6b4", alpha=0.5,
                   label=f"target band [{target - tol:.2f}, {target:.2f}]")
    ax.set_xlabel("search epoch")
    ax.set_ylabel("FLOPs / FLOPs of the full network")
    ax.set_title("FLOPs during the search")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_accuracy(search: list[dict[str, Any]], train: list[dict[str, Any]],
                  teacher_acc: float | None, path: Path) -> None:
    fig, axes = _figure((10, 3.6), ncols=2, sharey=True)
    for key, label in (("train_acc", "sampled shapes, train half"),
                       ("valid_acc", "architecture step, valid half"),
                       ("subnet_acc", "argmax shape, held-out (recalibrated)"),
                       ("teacher_acc", "teacher, same held-out images")):
        xs, ys = _series(search, key)
        if xs:
            axes[0].plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=label,
                         ls=":" if key == "teacher_acc" else "-")
    axes[0].set_title("Search (supernet)")
    axes[0].set_xlabel("search epoch")
    for key, label in (("acc", "train (augmented)"), ("test_acc", "test")):
        xs, ys = _series(train, key)
        axes[1].plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=label)
    if teacher_acc is not None:
        axes[1].axhline(100 * teacher_acc, color="grey", ls=":", label="unpruned teacher (test)")
    axes[1].set_title("Training the pruned shape")
    axes[1].set_xlabel("training epoch")
    axes[0].set_ylabel("top-1 accuracy (%)")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    _save(fig, path)


def plot_tau(search: list[dict[str, Any]], path: Path) -> None:
    fig, ax = _figure((6, 3.6))
    xs, tau = _series(search, "tau")
    ax.plot(xs, tau, color="#c05621", marker="o", markersize=3, label="tau")
    ax.set_xlabel("search epoch")
    ax.set_ylabel("Gumbel-softmax temperature tau", color="#c05621")
    ax2 = ax.twinx()
    for key, label, color in (("width_entropy", "width", "#2b6cb0"),
                              ("depth_entropy", "depth", "#2f855a")):
        xe, ye = _series(search, key)
        ax2.plot(xe, ye, marker="s", markersize=3, color=color,
                 label=f"mean entropy, {label} (nats)")
    ax2.set_ylabel("mean entropy of the distributions (nats)")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    ax.set_title("Temperature and distribution entropy")
    _save(fig, path)


def _fmt(n: float | None, digits: int = 2) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _flops_target(target: float | None) -> str:
    return "(no FLOP budget)" if target is None else f"(target {target})"


def budget_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) for every budget other than the FLOPs: its target, the shape's cost
    as priced (the latency table's prediction) and, for latency, the measured ratio (the
    inverse of the paired speed-up's median)."""
    speed = (summary.get("latency") or {}).get("speedup", {}).get("pruned", {})
    rows = []
    for name, b in summary.get("budgets", {}).items():
        if name == "flops":
            continue
        if name.startswith("latency@"):
            batch = name.split("@")[1]
            measured = speed.get(batch, {}).get("median")
            text = (f"target {b['target']}: table {b['ratio']:.3f}"
                    + (f", measured {1 / measured:.3f}" if measured else ""))
            rows.append((f"latency budget, batch {batch}", text))
        else:
            rows.append((f"{name} budget", f"target {b['target']}: {b['ratio']:.3f}"))
    return rows


def _summary_table(summary: dict[str, Any]) -> list[str]:
    lat = summary.get("latency_ms", {})
    dense, pruned = lat.get("dense", {}), lat.get("pruned", {})
    rows = [
        "| | unpruned | pruned | pruned / unpruned |",
        "| --- | ---: | ---: | ---: |",
        f"| top-1 accuracy (test) | {_pct(summary.get('acc_full'))} | "
        f"{_pct(summary.get('acc_pruned'))} | |",
        f"| FLOPs (MACs) | {_fmt(summary.get('flops_full'))} | "
        f"{_fmt(summary.get('flops_pruned'))} | "
        f"{summary['flops_pruned'] / summary['flops_full']:.3f} "
        f"{_flops_target(summary.get('flops_ratio_target'))} |"
        if summary.get("flops_full") else "| FLOPs | - | - | - |",
        f"| params | {_fmt(summary.get('params_full'))} | {_fmt(summary.get('params_pruned'))} | "
        f"{summary['params_pruned'] / summary['params_full']:.3f} |"
        if summary.get("params_full") else "| params | - | - | - |",
    ]
    rows += [f"| {label} | | | {text} |" for label, text in budget_rows(summary)]
    paired = summary.get("latency")
    if paired:
        return rows + _latency_rows(paired)
    for bs in sorted(set(dense) | set(pruned), key=int):  # a run from before paired timing
        d, p = dense.get(bs), pruned.get(bs)
        speed = f"{d / p:.2f}x faster" if d and p else ""
        rows.append(f"| CPU latency, batch {bs} (median) | "
                    f"{'-' if d is None else f'{d:.2f} ms'} | "
                    f"{'-' if p is None else f'{p:.2f} ms'} | {speed} |")
    return rows


def _spread_ms(spread: dict[str, float] | None) -> str:
    return "-" if spread is None else (f"{spread['median']:.2f} ms "
                                       f"[{spread['min']:.2f}, {spread['max']:.2f}]")


def _spread_ratio(spread: dict[str, float] | None, unit: str = "x faster") -> str:
    return "" if spread is None else (f"{spread['median']:.2f}{unit} "
                                      f"[{spread['min']:.2f}, {spread['max']:.2f}]")


def _latency_rows(paired: dict[str, Any]) -> list[str]:
    """Table rows of a paired latency: unpruned and pruned ms with the speed-up, then the
    folded forms (PyTorch, ONNX Runtime) with their speed-up over the unpruned net."""
    ms, speed = paired.get("ms", {}), paired.get("speedup", {})
    dense, pruned = ms.get("dense", {}), ms.get("pruned", {})
    rows = []
    for bs in sorted(set(dense) | set(pruned), key=int):
        rows.append(f"| CPU latency, batch {bs} | {_spread_ms(dense.get(bs))} | "
                    f"{_spread_ms(pruned.get(bs))} | "
                    f"{_spread_ratio(speed.get('pruned', {}).get(bs))} |")
    for name, label in (("folded", "folded BN, PyTorch"),
                        ("onnxruntime", "folded BN, ONNX Runtime")):
        for bs in sorted(ms.get(name, {}), key=int):
            rows.append(f"| {label}, batch {bs} | | {_spread_ms(ms[name][bs])} | "
                        f"{_spread_ratio(speed.get(name, {}).get(bs))} |")
    return rows


def latency_note(summary: dict[str, Any]) -> str | None:
    """How the summary's latency was measured, in one sentence (None for an old run)."""
    paired = summary.get("latency")
    if not paired:
        return None
    note = (f"Latency: {paired['threads']} threads, {paired['rounds']} rounds alternating the "
            "models; ms = median of the round medians [min, max]; speed-up = median of the "
            "per-round ratios unpruned / pruned [min, max].")
    skipped = paired.get("onnxruntime_skipped")
    return note + (f" ONNX Runtime skipped: {skipped}." if skipped else "")


def _derive_lines(derive: dict[str, Any]) -> list[str]:
    others = [f"{name} {b['ratio']:.3f} (target {b['target']})"
              for name, b in derive.get("budgets", {}).items() if name != "flops"]
    priced = (" Budgets, as fractions of the unpruned network's cost (latency as the "
              "per-layer table predicts it): " + ", ".join(others) + ".") if others else ""
    if derive.get("target_ratio") is None:  # no FLOP budget
        where = "meets every budget" if derive.get("in_band") else "misses a budget"
        moved = " (moved from the argmax shape)" if derive.get("adjusted") else ""
        return [f"The derived shape{moved} {where}: {derive['flops_ratio']:.3f} of the full "
                f"FLOPs.{priced}"]
    band = f"[{derive['target_ratio'] - derive.get('tolerance', 0.05):.3f}, " \
           f"{derive['target_ratio']:.3f}]"
    if derive.get("adjusted"):
        out = [f"The argmax shape ({derive['argmax_ratio']:.3f} of the full FLOPs) was outside "
               f"the target band {band}; the derived shape is the in-band shape closest to the "
               f"learned distributions, at {derive['flops_ratio']:.3f}."]
    else:
        where = "inside" if derive.get("in_band") else "outside"
        out = [f"The argmax shape is {where} the target band {band}: "
               f"{derive['flops_ratio']:.3f} of the full FLOPs."]
    out[0] += priced
    if derive.get("subnet_acc") is not None:
        teacher = derive.get("teacher_acc")
        out[0] += (f" Its accuracy cut from the supernet (BatchNorm recalibrated, held-out "
                   f"half): {_pct(derive['subnet_acc'])}"
                   + (f" (teacher {_pct(teacher)})." if teacher is not None else "."))
    return out


def convergence(search: list[dict[str, Any]]) -> str:
    """One line: did the width and depth distributions converge (mean entropy at most half
    of a uniform distribution's)?"""
    last = search[-1]
    parts, done = [], True
    for kind in ("width", "depth"):
        end, start = last.get(f"{kind}_entropy"), last.get(f"{kind}_entropy_max")
        if end is None or not start:
            continue
        done = done and end <= start / 2
        parts.append(f"mean {kind} entropy {end:.2f} nats of at most {start:.2f}")
    if not parts:
        return "No entropy was recorded."
    verdict = "converged" if done else "did not converge"
    return (f"The distributions {verdict} (at most half of the uniform entropy counts as "
            f"converged): {'; '.join(parts)}.")


def _health_table(search: list[dict[str, Any]]) -> list[str]:
    rows = ["| epoch | tau | expected FLOPs | argmax FLOPs | width entropy | depth entropy | "
            "argmax shape acc (teacher) |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in search:
        teacher = f" ({_pct(r['teacher_acc'])})" if r.get("teacher_acc") is not None else ""
        rows.append(f"| {r['epoch']} | {r['tau']:.2f} | {r['expected_ratio']:.3f} | "
                    f"{r['flops_ratio']:.3f} | {r['width_entropy']:.2f} | "
                    f"{r['depth_entropy']:.2f} | {_pct(r.get('subnet_acc'))}{teacher} |")
    return rows


def _shape_lines(shape: PlanShape) -> list[str]:
    """The shape section: costs, every channel group's width, the blocks every stage
    keeps, the groups kept at full width and why."""
    plan = shape.plan
    full = plan.full()
    flops, params = shape.count("flops"), shape.count("params")
    full_flops, full_params = full.count("flops"), full.count("params")
    space = "free shortcuts (a block whose widths differ grows a 1x1 projection)" \
        if plan.free else "one width per residual stream"
    lines = [
        "## Shape", "",
        f"{shape.describe()}; input {shape.in_channels}x{shape.resolution}x{shape.resolution}, "
        f"{shape.num_classes} classes; search space: {space}.", "",
        f"- FLOPs (multiply-accumulates of conv and linear layers): {flops:,} "
        f"({flops / full_flops:.3f} of the full network's {full_flops:,})",
        f"- params: {params:,} ({params / full_params:.3f} of {full_params:,})",
        f"- blocks kept per stage: {list(shape.blocks)} of "
        f"{[len(s) + 1 for s in plan.stages]}", "",
        "| channel group (first layer writing it) | full | kept |", "|---|---:|---:|"]
    used = shape.used_groups()
    for i, (g, w) in enumerate(zip(plan.searched, shape.widths, strict=True)):
        note = "" if i in used else " (in a dropped block)"
        lines.append(f"| {plan.groups[g].name}{note} | {plan.groups[g].size} | {w} |")
    if plan.stages:
        lines += ["", "| stage | blocks | kept |", "|---|---:|---:|"]
        for s, d in enumerate(shape.blocks):
            lines.append(f"| {plan.stage_name(s)} | {len(plan.stages[s]) + 1} | {d} |")
    fixed = [grp for grp in plan.groups if grp.fixed]
    if fixed:
        lines += ["", "Kept at full width: " + "; ".join(
            f"{grp.name} ({grp.size}, {grp.fixed})" for grp in fixed[:12])
            + (f"; and {len(fixed) - 12} more" if len(fixed) > 12 else "") + "."]
    return [*lines, ""]


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """(Re)generate `report.md` and its PNG plots in `run_dir`; returns the report's path."""
    run = Path(run_dir)
    if not (run / "shape.json").is_file():
        raise FileNotFoundError(f"{run}: no shape.json: not a tasprune run directory "
                                "(run `tasprune prune`, `search` or `train` into it first)")
    shape = read_shape(run / "shape.json")
    metrics = run / "metrics.jsonl"
    search = _records(metrics, "search")
    derive = next(iter(_records(metrics, "derive")[-1:]), None)
    train = _records(metrics, "train")
    summary = read_json(run / "summary.json") if (run / "summary.json").is_file() else {}
    teacher_acc = summary.get("acc_full")
    if teacher_acc is None:
        teacher = _records(metrics, "teacher") or _records(run / "teacher" / "metrics.jsonl",
                                                           "train")
        teacher_acc = next((r["test_acc"] for r in reversed(teacher) if "test_acc" in r), None)

    plot_widths(shape, run / "widths.png")
    plot_blocks(shape, run / "blocks.png")
    images = [("Width of every channel group", "widths.png"), ("Blocks per stage", "blocks.png")]
    if search:
        plot_flops(search, derive, run / "flops.png")
        plot_tau(search, run / "tau.png")
        images += [("FLOPs during the search", "flops.png"),
                   ("Temperature and entropy", "tau.png")]
    if search or train:
        plot_accuracy(search, train, teacher_acc, run / "accuracy.png")
        images.append(("Accuracy", "accuracy.png"))

    lines = [f"# tasprune run: {run.name}", ""]
    if summary:
        note = latency_note(summary)
        lines += ["## Summary", "", *_summary_table(summary), "",
                  *([note, ""] if note else [])]
    lines += _shape_lines(shape)
    if derive and derive.get("method", "tas") != "tas":
        budgets = ", ".join(f"{name} {b['ratio']:.3f} (target {b['target']})"
                            for name, b in derive.get("budgets", {}).items())
        lines += [f"Shape chosen by the {derive['method']} baseline (no search): "
                  f"{derive['flops_ratio']:.3f} of the full FLOPs"
                  + (f"; budgets: {budgets}." if budgets else
                     f", target {derive['target_ratio']}."), ""]
    elif derive:
        lines += [*_derive_lines(derive), ""]
    if search:
        lines += ["## Search health", "", convergence(search), "", *_health_table(search), ""]
    if train:
        last = train[-1]
        best = max((r.get("test_acc", -1) for r in train), default=None)
        lines += [f"Training: {last['epoch']} epochs, final test accuracy "
                  f"{_pct(last.get('test_acc'))}, best {_pct(best)}.", ""]
    for title, name in images:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += ["Files: `shape.json` (the searched shape), `model.safetensors` (weights, load with "
              "`tasprune.load_model`), `metrics.jsonl` (one line per epoch and phase), "
              "`config.yaml` (resolved settings).", ""]
    path = run / REPORT_FILE
    atomic_write_text(path, "\n".join(lines))
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table for the terminal."""
    lat = summary.get("latency_ms", {})
    dense, pruned = lat.get("dense", {}), lat.get("pruned", {})
    rows = [
        ("", "unpruned", "pruned", "pruned vs unpruned"),
        ("top-1 accuracy (test)", _pct(summary.get("acc_full")), _pct(summary.get("acc_pruned")),
         f"{100 * (summary['acc_pruned'] - summary['acc_full']):+.2f} pts"),
        ("FLOPs (MACs)", _fmt(summary["flops_full"]), _fmt(summary["flops_pruned"]),
         f"{summary['flops_pruned'] / summary['flops_full']:.3f} "
         f"{_flops_target(summary.get('flops_ratio_target'))}"),
        ("params", _fmt(summary["params_full"]), _fmt(summary["params_pruned"]),
         f"{summary['params_pruned'] / summary['params_full']:.3f}"),
    ]
    paired = summary.get("latency")
    if paired:
        ms, speed = paired.get("ms", {}), paired.get("speedup", {})
        for bs in sorted(set(ms.get("dense", {})) & set(ms.get("pruned", {})), key=int):
            rows.append((f"CPU latency, batch {bs}", _spread_ms(ms["dense"][bs]),
                         _spread_ms(ms["pruned"][bs]),
                         _spread_ratio(speed.get("pruned", {}).get(bs), "x speed-up")))
        for name, label in (("folded", "folded BN, PyTorch"),
                            ("onnxruntime", "folded BN, ONNX Runtime")):
            for bs in sorted(ms.get(name, {}), key=int):
                rows.append((f"{label}, batch {bs}", "", _spread_ms(ms[name][bs]),
                             _spread_ratio(speed.get(name, {}).get(bs), "x speed-up")))
    else:  # a run from before paired timing
        for bs in sorted(set(dense) & set(pruned), key=int):
            rows.append((f"CPU latency, batch {bs}", f"{dense[bs]:.2f} ms",
                         f"{pruned[bs]:.2f} ms", f"{dense[bs] / pruned[bs]:.2f}x speed-up"))
    rows += [(label, "", "", text) for label, text in budget_rows(summary)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    note = latency_note(summary)
    return "\n".join(lines + ([note] if note else []))
