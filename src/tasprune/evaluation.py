"""Evaluate a trained model: test accuracy, FLOPs, params and measured latency together.

Latency is always paired (`tasprune.latency.paired_latency`): a pruned model is timed in
alternating rounds against its unpruned counterpart, and, with `LatencyConfig.deploy`,
next to its deployable form (BatchNorm folded) in PyTorch and in ONNX Runtime.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasprune.data.source import DataBundle
from tasprune.deploy import OnnxRuntimeTarget, fold_batchnorm, onnxruntime_missing
from tasprune.device import check_fits_data
from tasprune.export import export_onnx
from tasprune.latency import LatencyConfig, Target, paired_latency
from tasprune.models.network import instantiate
from tasprune.net.plan import PlanShape
from tasprune.net.surgery import shape_of
from tasprune.training.loop import LoopOptions, evaluate

# how reports name the timed forms
LATENCY_LABELS = {"dense": "unpruned", "pruned": "pruned", "model": "this model",
                  "folded": "folded BN, PyTorch", "onnxruntime": "folded BN, ONNX Runtime"}


def latency_report(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    config: LatencyConfig,
    dense: nn.Module | None = None,
    name: str = "model",
) -> dict[str, Any]:
    """Paired latency of `model` (named `name`), against `dense` when given, and, when
    `config.deploy`, of its folded form in PyTorch ("folded") and ONNX Runtime
    ("onnxruntime"). Speed-ups are against "dense" when given, else against `model`.

    The dict is `PairedLatency.to_dict` plus "onnxruntime_skipped": why ONNX Runtime was
    not timed (a missing package, a failed export; "deploy timing is off" with
    `config.deploy` false), or None when it was.
    """
    targets: dict[str, nn.Module | Target] = {} if dense is None else {"dense": dense}
    targets[name] = model
    skipped: str | None = "deploy timing is off (latency.deploy=false)"
    with tempfile.TemporaryDirectory(prefix="tasprune-latency-") as tmp:
        if config.deploy:
            targets["folded"] = fold_batchnorm(model)
            skipped = onnxruntime_missing()
            if skipped is None and torch.device(config.device).type != "cpu":
                skipped = f"ONNX Runtime is timed on the CPU only, not {config.device}"
            if skipped is None:
                skipped = _add_onnxruntime(model, Path(tmp) / "model.onnx", targets)
        result = paired_latency(targets, input_shape, config)
    out = result.to_dict(baseline="dense" if dense is not None else name)
    out["onnxruntime_skipped"] = skipped
    return out


def _report_in_child(shapes: dict[str, PlanShape], states: dict[str, dict[str, torch.Tensor]],
                     input_shape: tuple[int, int, int], config: LatencyConfig,
                     name: str) -> dict[str, Any]:
    """`latency_report` of freshly built models (runs in a spawned process)."""
    models = {}
    for key, shape in shapes.items():
        models[key] = instantiate(shape)
        models[key].load_state_dict(states[key])
    return latency_report(models[name], input_shape, config, dense=models.get("dense"),
                          name=name)


def isolated_latency_report(model: nn.Module, input_shape: tuple[int, int, int],
                            config: LatencyConfig, dense: nn.Module | None = None,
                            name: str = "model") -> dict[str, Any]:
    """`latency_report` in a fresh process, on copies of the models.

    A process that has just trained times its models differently from one that has not
    (measured: the demo's pruned net 1.01x faster than its teacher at batch 64 in the
    process that trained both, 1.56-1.85x in fresh processes); a clean process gives the
    number a user who loads the model will see. Falls back to this process (saying so in
    "isolated") when a process cannot be started."""
    import concurrent.futures
    import multiprocessing

    shapes = {name: shape_of(model), **({} if dense is None else {"dense": shape_of(dense)})}
    states = {name: _cpu_state(model), **({} if dense is None else {"dense": _cpu_state(dense)})}
    if any(s.source is None or s.source.name is None for s in shapes.values()):
        out = latency_report(model, input_shape, config, dense=dense, name=name)
        out["isolated"] = ("timed in this process: the network was given as a module, which "
                           "a fresh process cannot rebuild")
        return out
    try:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            out = pool.submit(_report_in_child, shapes, states, input_shape, config,
                              name).result()
        out["isolated"] = True
    except (OSError, concurrent.futures.process.BrokenProcessPool) as exc:
        out = latency_report(model, input_shape, config, dense=dense, name=name)
        out["isolated"] = f"timed in this process: no fresh one could start ({exc})"
    return out


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _add_onnxruntime(model: nn.Module, path: Path, targets: dict[str, nn.Module | Target]
                     ) -> str | None:
    """Export `model` (folded) to `path` and add its ONNX Runtime session to `targets`;
    the reason on failure (timing is a measurement: a failed export must not end it)."""
    try:
        export_onnx(model, path)
        target = OnnxRuntimeTarget(path)
        target.session(1)  # fails here, not inside the timing, on a bad graph
    except Exception as exc:  # noqa: BLE001 - any exporter/runtime error is reported, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the ONNX export or session failed: {first}"
    targets["onnxruntime"] = target
    return None


def evaluate_model(
    model: nn.Module,
    data: DataBundle,
    device: torch.device,
    batch_size: int = 256,
    latency: LatencyConfig | None = LatencyConfig(),
    quiet: bool = False,
    what: str = "model",
) -> dict[str, Any]:
    """Accuracy on `data.test`, exact FLOPs/params at the data's resolution, CPU latency.

    `latency=None` skips the timing. Keys: acc, top5, loss (fractions / nats), images,
    flops, params, latency_ms (str(batch) -> median ms of the model), threads, and
    latency (`latency_report`: a pruned model is timed against its unpruned counterpart,
    built with random weights, which do not change the timing).
    """
    shape = shape_of(model)
    check_fits_data(shape, data, what)
    test = evaluate(model.to(device), data.test, data.transform,
                    LoopOptions(batch_size=batch_size, device=device, quiet=quiet, desc=what))
    out = {"acc": test["acc"], "top5": test["top5"], "loss": test["loss"],
           "images": int(test["images"]), "flops": shape.count("flops"),
           "params": shape.count("params"), "latency_ms": {}, "threads": torch.get_num_threads()}
    if latency is not None:
        dense = None
        if not shape.is_full and shape.source is not None and shape.source.name is not None:
            dense = instantiate(shape.plan.full())
        timed = latency_report(model, (shape.in_channels, shape.resolution, shape.resolution),
                               latency, dense=dense)
        out["latency"] = timed
        out["latency_ms"] = {b: s["median"] for b, s in timed["ms"]["model"].items()}
        out["threads"] = timed["threads"]
    return out


def latency_lines(latency: dict[str, Any], labels: dict[str, str] | None = None) -> list[str]:
    """A `latency_report` dict as aligned plain-text lines: one row per timed form, one
    column per batch size (median ms [min, max of round medians], speed-up [min, max])."""
    labels = {**LATENCY_LABELS, **(labels or {})}
    base = latency.get("baseline")
    batches = sorted({b for rows in latency["ms"].values() for b in rows}, key=int)
    rows = [["", *[f"batch {b}" for b in batches]]]
    for name, by_batch in latency["ms"].items():
        cells = [labels.get(name, name)]
        for b in batches:
            cell = _ms(by_batch.get(b))
            speed = latency.get("speedup", {}).get(name, {}).get(b)
            if speed is not None:
                cell += f"  {_ratio(speed)}"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    against = labels.get(base, base) if base else None
    head = [f"CPU latency, {latency['threads']} threads, {latency['rounds']} rounds alternating "
            "the models",
            "  ms: median of the round medians [min, max]"
            + (f"; speed-up vs {against}: median of the per-round ratios [min, max]"
               if against and latency.get("speedup") else "")]
    skipped = latency.get("onnxruntime_skipped")
    tail = [f"  ONNX Runtime skipped: {skipped}"] if skipped else []
    return [*head, *lines, *tail]


def _ms(spread: dict[str, float] | None) -> str:
    if spread is None:
        return "-"
    return f"{spread['median']:.2f} ms [{spread['min']:.2f}, {spread['max']:.2f}]"


def _ratio(spread: dict[str, float]) -> str:
    return f"{spread['median']:.2f}x [{spread['min']:.2f}, {spread['max']:.2f}]"
