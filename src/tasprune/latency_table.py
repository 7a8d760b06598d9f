"""A per-layer latency table: the measured cost model of a latency budget.

FLOPs are a poor proxy for speed on small, memory-bound convs, so a latency
budget is priced with measured times. Every layer the FLOP walk of
`tasprune.flops` yields is an *operation* (its role in the network and its sizes:
kernel, stride, input resolution) applied to an input and an output width. The
table holds the median time of that operation, alone, at a fixed batch size,
device and thread count, for every pair of widths the search space can give it:

* ``stem``: conv + BN + ReLU (+ the 3x3 max pool of ImageNet stems);
* ``conv``: conv + BN + ReLU inside a block;
* ``conv_add``: a block's last conv + BN, the residual addition, ReLU;
* ``shortcut``: (average pool when strided) + 1x1 conv (+ BN);
* ``fc``: global average pool + the classifier.

The predicted latency of a shape is the sum over its layers; the expected latency
under the search's width and depth distributions is the same sum with every
layer's time averaged over its input and output width distributions and weighted
by the probability that its block is kept, so it is differentiable in the logits
as the expected FLOPs are (and equals the prediction at one-hot logits).

Tables are cached on disk, one JSON file per device, thread count, torch version
and batch size, under `cache_dir()`; entries are per operation and width pair, so
every model and search space that shares an operation shares its time. Entries a
shape needs that are not in the table yet are timed when first asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tasprune._io import atomic_write_text
from tasprune.flops import DepthDist, Layer, WidthDist, expected_layers, layer_table
from tasprune.shape import Shape

FORMAT = "tasprune.latency_table/1"
Key = tuple[tuple[object, ...], int, int]


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


class _Op(nn.Module):
    """One timed operation at given widths (see the module docstring)."""

    def __init__(self, op: tuple[object, ...], cin: int, cout: int) -> None:
        super().__init__()
        self.role = str(op[0])
        if self.role == "fc":
            self.fc = nn.Linear(cin, cout)
            return
        if self.role == "shortcut":
            stride, bn = int(op[1]), bool(op[3])  # type: ignore[call-overload]
            self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else None
            self.conv = nn.Conv2d(cin, cout, 1, bias=False)
            self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
            return
        kernel, stride = int(op[1]), int(op[2])  # type: ignore[call-overload]
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.maxpool = self.role == "stem" and bool(op[4])

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.role == "fc":
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.role == "shortcut":
            return self.bn(self.conv(x if self.pool is None else self.pool(x)))
        y = self.bn(self.conv(x))
        if skip is not None:
            y = y + skip
        y = F.relu(y, inplace=True)
        return F.max_pool2d(y, 3, 2, 1) if self.role == "stem" and self.maxpool else y


def _in_res(op: tuple[object, ...]) -> int:
    return int(op[3] if op[0] in ("stem", "conv", "conv_add") else op[2] if op[0] == "shortcut"
               else op[1])  # type: ignore[call-overload]


def time_op(op: tuple[object, ...], cin: int, cout: int, batch: int, device: torch.device,
            warmup: int = 2, repeats: int = 7) -> float:
    """Milliseconds of one operation at widths (cin, cout) on random input: the fastest of
    `repeats` passes (other work on the machine only ever adds time; a table timed beside
    a test suite had entries 20-100x too slow with the median)."""
    module = _Op(op, cin, cout).to(device).eval()
    res = _in_res(op)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, res, res, generator=gen).to(device)
    skip = None
    if op[0] == "conv_add":
        with torch.inference_mode():
            skip = torch.zeros_like(module.conv(x))
    return fastest_ms(lambda: module(x, skip), device, warmup, repeats)


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


def _values(w: int | WidthDist) -> list[int]:
    return [w] if isinstance(w, int) else [int(v) for v in w.values.tolist()]


class LatencyTable:
    """Measured per-layer times (ms) at one batch size, device and thread count.

    `predict(shape)` is a shape's latency as the sum of its layers' times;
    `expected(skeleton, widths, depths)` the differentiable expectation under width
    and depth distributions. Missing entries are timed on first use and, when the
    table has a `path`, written back to it."""

    def __init__(self, batch: int, device: str | torch.device = "cpu", threads: int = 0,
                 path: Path | None = None, timer: Callable[..., float] = time_op) -> None:
        self.batch = int(batch)
        self.device = torch.device(device)
        self.threads = int(threads) or torch.get_num_threads()
        self.path = path
        self.timer = timer
        self.entries: dict[Key, float] = {}
        self._matrices: dict[tuple[object, ...], torch.Tensor] = {}
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
                 "batch": int(batch)}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        name = f"{dev.type}-t{threads}-b{batch}-{digest}.json"
        return cls(batch, dev, threads, (directory or cache_dir()) / name)

    def _read(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                return
            self.entries = {_decode(k): float(v) for k, v in data["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.entries = {}  # a damaged cache is timed again, not trusted

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
                self.entries[(op, cin, cout)] = self.timer(op, cin, cout, self.batch,
                                                           self.device)
                if progress is not None:
                    progress(i + 1, len(missing))
        finally:
            torch.set_num_threads(before)
        self._matrices.clear()
        self.save()
        return len(missing)

    def check(self, shape: Shape, passes: int = 5) -> tuple[float, float]:
        """(predicted ms, measured ms: the fastest of `passes` forward passes) of the
        network of `shape`, at the table's batch size and thread count."""
        from tasprune.models import build_model

        model = build_model(shape).to(self.device).eval()
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
        times them again. Entries of other models in the same file stay."""
        if keys is None:
            self.entries.clear()
        else:
            for key in keys:
                self.entries.pop(key, None)
        self._matrices.clear()
        self.save()

    # prediction -----------------------------------------------------------------------
    def predict(self, shape: Shape) -> float:
        """Predicted milliseconds of the network of `shape` (sum of its layers' times)."""
        layers = layer_table(shape)
        self.fill(key for layer in layers for key in _keys(layer))
        return sum(self.entries[(layer.op, int(layer.cin), int(layer.cout))]  # type: ignore[arg-type]
                   for layer in layers)

    def expected(self, skeleton: object, widths: Sequence[WidthDist],
                 depths: Sequence[DepthDist]) -> torch.Tensor:
        """Expected milliseconds under independent width and depth distributions (widths
        shared as one object are one variable; see `tasprune.flops`)."""
        total: torch.Tensor | None = None
        for layer in expected_layers(skeleton, widths, depths):  # type: ignore[arg-type]
            term = self._expected_layer(layer)
            if term is not None:
                total = term if total is None else total + term
        assert total is not None
        return total

    def _expected_layer(self, layer: Layer) -> torch.Tensor | None:
        a, b = layer.cin, layer.cout
        if layer.conditional and a is b:
            return None  # tied widths never differ: the projection never exists
        ref = a if isinstance(a, WidthDist) else b
        assert isinstance(ref, WidthDist)
        va, vb = _values(a), _values(b)
        cache = (layer.op, tuple(va), tuple(vb), layer.conditional)
        t = self._matrices.get(cache)
        if t is None:
            self.fill((layer.op, i, o) for i in va for o in vb if not layer.conditional or i != o)
            t = torch.tensor([[0.0 if layer.conditional and i == o else
                               self.entries[(layer.op, i, o)] for o in vb] for i in va],
                             dtype=torch.float64)
            self._matrices[cache] = t
        t = t.to(device=ref.probs.device, dtype=ref.probs.dtype)
        pa = a.probs if isinstance(a, WidthDist) else ref.probs.new_ones(1)
        pb = b.probs if isinstance(b, WidthDist) else ref.probs.new_ones(1)
        return layer.keep * (pa @ t @ pb)

    def keys_of_space(self, space: object) -> set[Key]:
        """Every (operation, widths) the shapes of a search space (and its unpruned network)
        can use."""
        from tasprune.tas.space import SearchSpace  # the space imports nothing of this

        assert isinstance(space, SearchSpace)
        dists = [WidthDist(torch.tensor(c, dtype=torch.float64),
                           torch.full((len(c),), 1.0 / len(c), dtype=torch.float64))
                 for c in space.widths]
        depths = [DepthDist(c, torch.full((len(c),), 1.0 / len(c), dtype=torch.float64))
                  for c in space.depths]
        keys: set[Key] = set()
        for layer in expected_layers(space.full.skeleton, [dists[t] for t in space.ties],
                                     depths):
            for i in _values(layer.cin):  # type: ignore[arg-type]
                for o in _values(layer.cout):  # type: ignore[arg-type]
                    if not (layer.conditional and i == o):
                        keys.add((layer.op, i, o))
        for layer in layer_table(space.full):
            keys.update(_keys(layer))
        return keys


def _keys(layer: Layer) -> list[Key]:
    return [(layer.op, int(layer.cin), int(layer.cout))]  # type: ignore[arg-type]
