"""A per-layer latency table: the measured cost model of a latency budget.

FLOPs are a poor proxy for speed on small, memory-bound convs, so a latency budget is
priced with measured times. Every layer of a network's plan (`tasprune.net.plan`) is an
*operation* (what it is and its sizes, without the widths) applied at an input and an
output width:

* ``conv``: a Conv2d (kernel, stride, padding, dilation, input size, groups, bias)
  followed by its BatchNorm when it has one (`PlanLayer.norm`);
* ``dwconv``: a depthwise conv (+ its BatchNorm), at width c -> c;
* ``linear``: a Linear over `spatial` positions per input channel;
* ``bn``: a BatchNorm that follows no conv (a pre-activation network's), at c -> c.

The table holds the fastest time of that operation, alone, at a fixed batch size,
device and thread count, for every pair of widths the search space can give it. The
predicted latency of a shape is the sum over the layers its network has; the expected
latency under the search's width and depth distributions is the same sum with every
layer's time averaged over its width distributions (a concatenation's input width over
the sum of its parts') and weighted by the probability that its block is kept, so it is
differentiable in the logits as the expected FLOPs are, and equals the prediction at
one-hot logits.

Tables are cached on disk, one JSON file per device, thread count, torch version and
batch size, under `cache_dir()`; entries are per operation and width pair, so every
network that shares an operation shares its time. Entries that are not finite or not
positive (a damaged file) are dropped and timed again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from tasprune._io import atomic_write_text
from tasprune.net.plan import DepthDist, LayerPlan, PlanLayer, PlanShape, WidthDist

FORMAT = "tasprune.latency_table/2"
Key = tuple[tuple[object, ...], int, int]
MAX_JOINT = 512  # width combinations of a concatenation the expectation enumerates


def cache_dir() -> Path:
    """Where latency tables are kept: $TASPRUNE_CACHE, else $XDG_CACHE_HOME/tasprune, else
    ~/.cache/tasprune (a `latency` folder inside)."""
    if os.environ.get("TASPRUNE_CACHE"):
        return Path(os.environ["TASPRUNE_CACHE"]) / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tasprune" / "latency"


def device_name(device: torch.device) -> str:
    """The device as the cache key sees it: the GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model}"


def operation(layer: PlanLayer) -> tuple[object, ...] | None:
    """The operation a layer times as (None: timed with the conv it normalises)."""
    if layer.kind == "linear":
        return ("linear", layer.spatial, layer.bias)
    if layer.kind == "bn":
        return None if layer.norm_of else ("bn", layer.pixels)
    kind = "dwconv" if layer.depthwise else "conv"
    return (kind, *layer.geometry, layer.groups, layer.bias, layer.norm is not None)


class _Op(nn.Module):
    """One timed operation at given widths (see the module docstring)."""

    def __init__(self, op: tuple[object, ...], cin: int, cout: int) -> None:
        super().__init__()
        self.kind = str(op[0])
        self.body: nn.Module
        if self.kind == "linear":
            self.body = nn.Linear(cin * int(op[1]), cout, bias=bool(op[2]))  # type: ignore[call-overload]
        elif self.kind == "bn":
            self.body = nn.BatchNorm2d(cin)
        else:
            kh, kw, sh, sw, ph, pw, dh, dw = (int(v) for v in op[1:9])  # type: ignore[call-overload]
            groups = cin if self.kind == "dwconv" else int(op[11])  # type: ignore[call-overload]
            conv = nn.Conv2d(cin, cout, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups,
                             bias=bool(op[12]))
            self.body = nn.Sequential(conv, nn.BatchNorm2d(cout)) if op[13] else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _input(op: tuple[object, ...], cin: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if op[0] == "linear":
        return torch.randn(batch, cin * int(op[1]), generator=gen)  # type: ignore[call-overload]
    if op[0] == "bn":
        return torch.randn(batch, cin, int(op[1]), 1, generator=gen)  # type: ignore[call-overload]
    h, w = int(op[9]), int(op[10])  # type: ignore[call-overload]
    return torch.randn(batch, cin, h, w, generator=gen)


def time_op(op: tuple[object, ...], cin: int, cout: int, batch: int, device: torch.device,
            warmup: int = 2, repeats: int = 7) -> float:
    """Milliseconds of one operation at widths (cin, cout) on random input: the fastest of
    `repeats` passes (other work on the machine only ever adds time; a table timed beside
    a test suite had entries 20-100x too slow with the median)."""
    module = _Op(op, cin, cout).to(device).eval()
    x = _input(op, cin, batch).to(device)
    return fastest_ms(lambda: module(x), device, warmup, repeats)


def fastest_ms(run: Callable[[], object], device: torch.device, warmup: int, repeats: int
               ) -> float:
    """Milliseconds of the fastest of `repeats` calls of `run` after `warmup` untimed ones,
    under inference mode."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000.0 * min(times)


def _encode(key: Key) -> str:
    return json.dumps([list(key[0]), key[1], key[2]])


def _decode(text: str) -> Key:
    op, cin, cout = json.loads(text)
    return tuple(op), int(cin), int(cout)


class _Choices:
    """The width distributions a latency expectation reads: of every group (a fixed one
    is its size with probability 1) and of every stage's depth."""

    def __init__(self, plan: LayerPlan, widths: Sequence[WidthDist],
                 depths: Sequence[DepthDist]) -> None:
        self.plan = plan
        self.dist = dict(zip(plan.searched, widths, strict=True))
        self.depths = depths
        self.like = widths[0].probs if widths else (
            depths[0].probs if depths else torch.ones(1, dtype=torch.float64))

    def group(self, g: int) -> tuple[list[int], torch.Tensor]:
        if g in self.dist:
            d = self.dist[g]
            return [int(v) for v in d.values.tolist()], d.probs
        return [self.plan.groups[g].size], self.like.new_ones(1)

    def read(self, layer: PlanLayer, i: int) -> tuple[list[int], torch.Tensor]:
        """Widths and probabilities of read `i` (a stage's output: over its depths)."""
        s = layer.stage_read(i)
        if s is None:
            return self.group(layer.reads[i])
        values: list[int] = []
        probs = []
        depth = self.depths[s]
        outputs = self.plan.stage_outputs(s)
        for n, d in enumerate(depth.choices):
            g = outputs[d - 1]
            v, p = self.group(layer.reads[i] if g is None else g)
            values += v
            probs.append(depth.probs[n] * p)
        return values, torch.cat(probs)

    def cin(self, layer: PlanLayer) -> tuple[list[int], torch.Tensor]:
        """The input width's distribution (a concatenation: of the sum of its parts)."""
        parts = [self.read(layer, i) for i in range(len(layer.reads))]
        if len(parts) == 1:
            return parts[0]
        if math.prod(len(v) for v, _ in parts) > MAX_JOINT:
            raise ValueError(f"latency budget: {layer.name} reads {len(parts)} concatenated "
                             "channel groups, too many width combinations to time; use a "
                             "FLOP or parameter budget for this network")
        sums: dict[int, torch.Tensor] = {}
        for combo in itertools.product(*(range(len(v)) for v, _ in parts)):
            total = sum(parts[k][0][c] for k, c in enumerate(combo))
            p = torch.stack([parts[k][1][c] for k, c in enumerate(combo)]).prod()
            sums[total] = sums[total] + p if total in sums else p
        return list(sums), torch.stack(list(sums.values()))


class LatencyTable:
    """Measured per-layer times (ms) at one batch size, device and thread count.

    `predict(shape)` is a shape's latency as the sum of its layers' times;
    `expected(plan, widths, depths)` the differentiable expectation under width and depth
    distributions. Missing entries are timed on first use and, when the table has a
    `path`, written back to it."""

    def __init__(self, batch: int, device: str | torch.device = "cpu", threads: int = 0,
                 path: Path | None = None, timer: Callable[..., float] = time_op) -> None:
        self.batch = int(batch)
        self.device = torch.device(device)
        self.threads = int(threads) or torch.get_num_threads()
        self.path = path
        self.timer = timer
        self.entries: dict[Key, float] = {}
        self._matrices: dict[tuple[object, ...], torch.Tensor] = {}
        self.dropped = 0  # damaged entries of the file, dropped when it was read
        if path is not None and path.is_file():
            self._read(path)

    @classmethod
    def cached(cls, batch: int, device: str | torch.device = "cpu", threads: int = 0,
               directory: Path | None = None) -> LatencyTable:
        """The table of this machine's `device` at `threads` threads (0: torch's current
        count) and `batch`, read from (and written to) the cache."""
        dev = torch.device(device)
        threads = int(threads) or torch.get_num_threads()
        ident = {"device": device_name(dev), "threads": threads, "torch": torch.__version__,
                 "batch": int(batch), "format": FORMAT}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        name = f"{dev.type}-t{threads}-b{batch}-{digest}.json"
        return cls(batch, dev, threads, (directory or cache_dir()) / name)

    def _read(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                return
            entries = {_decode(k): float(v) for k, v in data["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.entries = {}  # a damaged cache is timed again, not trusted
            return
        self.entries = {k: v for k, v in entries.items() if math.isfinite(v) and v > 0}
        self.dropped = len(entries) - len(self.entries)

    def save(self) -> None:
        """Write the table to its path (atomically)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "batch": self.batch, "device": device_name(self.device),
                "threads": self.threads, "torch": torch.__version__,
                "entries": {_encode(k): v for k, v in sorted(self.entries.items(), key=str)}}
        atomic_write_text(self.path, json.dumps(data, indent=0))

    # filling --------------------------------------------------------------------------
    def fill(self, keys: Iterable[Key], progress: Callable[[int, int], None] | None = None
             ) -> int:
        """Time every key not in the table yet (at the table's thread count); return how
        many were timed. Saves the table when any was."""
        missing = sorted({k for k in keys if k not in self.entries}, key=str)
        if not missing:
            return 0
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            for i, (op, cin, cout) in enumerate(missing):
                ms = self.timer(op, cin, cout, self.batch, self.device)
                if not (math.isfinite(ms) and ms > 0):
                    raise RuntimeError(f"latency table: timing {op} at {cin} -> {cout} "
                                       f"channels gave {ms} ms")
                self.entries[(op, cin, cout)] = ms
                if progress is not None:
                    progress(i + 1, len(missing))
        finally:
            torch.set_num_threads(before)
        self._matrices.clear()
        self.save()
        return len(missing)

    def check(self, model: nn.Module, shape: PlanShape, passes: int = 5
              ) -> tuple[float, float]:
        """(predicted ms, measured ms: the fastest of `passes` forward passes) of `model`,
        the network of `shape`, at the table's batch size and thread count."""
        model = model.to(self.device).eval()
        size = (self.batch, shape.in_channels, shape.resolution, shape.resolution)
        x = torch.randn(*size, generator=torch.Generator().manual_seed(0)).to(self.device)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            measured = fastest_ms(lambda: model(x), self.device, 2, passes)
        finally:
            torch.set_num_threads(before)
        return self.predict(shape), measured

    def forget(self, keys: Iterable[Key] | None = None) -> None:
        """Drop `keys` (default: every entry) from the table and its file: the next use
        times them again. Entries of other networks in the same file stay."""
        if keys is None:
            self.entries.clear()
        else:
            for key in keys:
                self.entries.pop(key, None)
        self._matrices.clear()
        self.save()

    # prediction -----------------------------------------------------------------------
    def _shape_keys(self, shape: PlanShape) -> list[Key]:
        widths, kept = shape.group_widths(), shape.kept_blocks()
        keys = []
        for layer in shape.plan.layers:
            op = operation(layer)
            if op is None or not shape.active(layer, widths, kept):
                continue
            cin = sum(shape.read_width(layer, i, widths) for i in range(len(layer.reads)))
            cout = cin if layer.writes is None else widths[layer.writes]
            keys.append((op, cin, cout))
        return keys

    def predict(self, shape: PlanShape) -> float:
        """Predicted milliseconds of the network of `shape` (sum of its layers' times)."""
        keys = self._shape_keys(shape)
        self.fill(keys)
        return sum(self.entries[k] for k in keys)

    def expected(self, plan: LayerPlan, widths: Sequence[WidthDist],
                 depths: Sequence[DepthDist]) -> torch.Tensor:
        """Expected milliseconds under independent width and depth distributions."""
        choices = _Choices(plan, widths, depths)
        total = choices.like.new_zeros(())
        for layer in plan.layers:
            op = operation(layer)
            if op is None:
                continue
            keep = 1.0 if layer.block is None else depths[plan.blocks[layer.block].stage] \
                .keep_prob(plan.blocks[layer.block].index)
            total = total + keep * self._expected_layer(layer, op, choices)
        return total

    def _matrix(self, op: tuple[object, ...], va: list[int], vb: list[int],
                skip_equal: bool) -> torch.Tensor:
        cache = (op, tuple(va), tuple(vb), skip_equal)
        t = self._matrices.get(cache)
        if t is None:
            self.fill((op, i, o) for i in va for o in vb if not (skip_equal and i == o))
            t = torch.tensor([[0.0 if skip_equal and i == o else self.entries[(op, i, o)]
                               for o in vb] for i in va], dtype=torch.float64)
            self._matrices[cache] = t
        return t

    def _diagonal(self, op: tuple[object, ...], values: list[int]) -> torch.Tensor:
        """Times at widths c -> c (a depthwise conv, a BatchNorm, a layer whose input and
        output are one group)."""
        cache = (op, tuple(values), "diagonal")
        t = self._matrices.get(cache)
        if t is None:
            self.fill((op, v, v) for v in values)
            t = torch.tensor([self.entries[(op, v, v)] for v in values], dtype=torch.float64)
            self._matrices[cache] = t
        return t

    def _expected_layer(self, layer: PlanLayer, op: tuple[object, ...], choices: _Choices
                        ) -> torch.Tensor:
        va, pa = choices.cin(layer)
        if layer.writes is None or (layer.reads == (layer.writes,) and not layer.after):
            return (pa * self._diagonal(op, va).to(pa)).sum()  # c -> c: one variable
        vb, pb = choices.group(layer.writes)
        t = self._matrix(op, va, vb, layer.when is not None).to(pa)
        return pa @ t @ pb

    def keys_of_space(self, space: object) -> set[Key]:
        """Every (operation, widths) the shapes of a search space (and its unpruned network)
        can use."""
        plan: LayerPlan = space.plan  # type: ignore[attr-defined]
        uniform = [WidthDist(torch.tensor(c, dtype=torch.float64),
                             torch.full((len(c),), 1.0 / len(c), dtype=torch.float64))
                   for c in space.widths]  # type: ignore[attr-defined]
        depths = [DepthDist(c, torch.full((len(c),), 1.0 / len(c), dtype=torch.float64))
                  for c in space.depths]  # type: ignore[attr-defined]
        choices = _Choices(plan, uniform, depths)
        keys: set[Key] = set()
        for layer in plan.layers:
            op = operation(layer)
            if op is None:
                continue
            va, _ = choices.cin(layer)
            if layer.writes is None or (layer.reads == (layer.writes,) and not layer.after):
                keys.update((op, v, v) for v in va)
                continue
            vb, _ = choices.group(layer.writes)
            keys.update((op, i, o) for i in va for o in vb
                        if not (layer.when is not None and i == o))
        keys.update(self._shape_keys(plan.full()))
        return keys
