"""Search step vs plain training step throughput, measured in one process.

For every model: `search_img_per_s` counts both batches of a search step of the
default procedure (the weight step on a train batch, distilling from the unpruned
teacher's forward on it, and the architecture step on a valid batch, as
`tasprune.tas.step.search_step` runs them); `paper_img_per_s` the same for
the paper's procedure (Gumbel top-2 with channel-wise interpolation in both steps, no
teacher); `plain_img_per_s` is plain
SGD training (forward, cross-entropy, backward, step) of the unpruned ResNet at
the same batch size, as tasprune's trainer runs it on CPU (NCHW).
`plain_cl_img_per_s` is the same plain training in channels-last memory format
(the layout the supernet uses internally), for reference. All are timed in
alternating rounds so machine noise hits each; the ratios of their medians are
printed as one JSON line per model. With `--amp bf16|fp16` (on CUDA: `--device cuda`)
the default search step is also timed under that mixed precision (`search_amp_img_per_s`,
`amp_speedup` over the fp32 search step). `search_ops`, `paper_ops` and `plain_ops` are
the aten operations one step dispatches (forward, backward and optimiser, counted with
TorchDispatchMode after the warm-up step): what each step costs in kernel launches on a
GPU, whatever the batch.

    python benchmarks/search_speed.py --model resnet20 resnet56 --batch 128 --threads 2
    python benchmarks/search_speed.py --model resnet56 --batch 256 --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tasprune import ModelSpec, build_model
from tasprune.models.network import full_network
from tasprune.tas.searcher import SearchConfig
from tasprune.tas.space import SearchSpace
from tasprune.tas.step import search_step
from tasprune.tas.supernet import SuperNet


def _time(fn: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], None]) -> int:
    """The aten operations one call of `fn` dispatches."""
    with _OpCounter() as counter:
        fn()
    return counter.count


def bench(model: str, batch: int, steps: int, rounds: int, tau: float, resolution: int,
          classes: int, seed: int, device: str = "cpu", amp: str = "off"
          ) -> dict[str, object]:
    torch.manual_seed(seed)
    dev = torch.device(device)
    spec = ModelSpec(model, classes, 3, resolution)
    _, plan = full_network(spec, free=True)  # the paper's space: a group per conv
    full = plan.full()
    x = torch.randn(batch, 3, resolution, resolution, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    xv = torch.randn(batch, 3, resolution, resolution, device=dev)
    yv = torch.randint(0, classes, (batch,), device=dev)

    plain = build_model(full).train().to(dev)
    p_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                            weight_decay=5e-4)

    def plain_step() -> None:
        loss = F.cross_entropy(plain(x), y)
        p_opt.zero_grad(set_to_none=True)
        loss.backward()
        p_opt.step()

    plain_cl = build_model(full).train().to(dev, memory_format=torch.channels_last)
    cl_opt = torch.optim.SGD(plain_cl.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                             weight_decay=5e-4)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def plain_cl_step() -> None:
        loss = F.cross_entropy(plain_cl(x_cl), y)
        cl_opt.zero_grad(set_to_none=True)
        loss.backward()
        cl_opt.step()

    teacher = build_model(full).eval().to(dev, memory_format=torch.channels_last)
    full_flops = full.count("flops")

    def searcher(config: SearchConfig, kd: bool, amp: str = "off") -> Callable[[], None]:
        net = SuperNet(SearchSpace.from_plan(plan), full_network(spec, free=True, seed=seed)[0],
                       torch.Generator().manual_seed(seed))
        net = net.train().to(dev)
        w_opt = torch.optim.SGD(net.weight_parameters(), lr=config.lr,
                                momentum=config.momentum, nesterov=True,
                                weight_decay=config.weight_decay)
        a_opt = torch.optim.Adam(net.arch_parameters(), lr=config.arch_lr,
                                 betas=config.arch_betas, weight_decay=config.arch_weight_decay)
        gen = torch.Generator(dev).manual_seed(seed)
        scalers = tuple(torch.amp.GradScaler(dev.type) for _ in range(2)) if amp == "fp16" else ()
        return lambda: search_step(net, (x, y), (xv, yv), w_opt, a_opt, config, tau, gen,
                                   full_flops, teacher=teacher if kd else None, amp=amp,
                                   scalers=scalers)

    default = searcher(SearchConfig(flops_ratio=0.5, batch_size=batch, seed=seed), kd=True)
    paper = searcher(SearchConfig(flops_ratio=0.5, batch_size=batch, lr=0.1, arch_lr=1e-3,
                                  seed=seed, relaxation="gumbel", kd_alpha=0.0), kd=False)
    steps_of = {"plain": plain_step, "plain_cl": plain_cl_step, "search": default,
                "paper": paper}
    if amp != "off":
        steps_of["search_amp"] = searcher(SearchConfig(flops_ratio=0.5, batch_size=batch,
                                                       seed=seed), kd=True, amp=amp)
    for fn in steps_of.values():  # warm-up (allocator, oneDNN caches)
        fn()
    ops = {name: count_ops(steps_of[name]) for name in ("plain", "search", "paper")}

    def timed(fn: Callable[[], None]) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = _time(fn, steps)
        if dev.type == "cuda":
            start = time.perf_counter()
            torch.cuda.synchronize()
            seconds += time.perf_counter() - start
        return seconds

    seconds: dict[str, list[float]] = {k: [] for k in steps_of}
    for _ in range(rounds):
        for name, fn in steps_of.items():
            seconds[name].append(timed(fn))
    ips = {k: batch * steps / statistics.median(v) for k, v in seconds.items()}
    for name in ("search", "paper", "search_amp"):
        if name in ips:
            ips[name] *= 2  # both batches of a search step
    extra = {} if amp == "off" else {
        "amp": amp, "search_amp_img_per_s": round(ips["search_amp"], 1),
        "amp_speedup": round(ips["search_amp"] / ips["search"], 3)}
    return {
        "device": str(dev), **extra,
        "model": model, "batch": batch, "threads": torch.get_num_threads(), "tau": tau,
        "steps": steps, "rounds": rounds,
        "search_img_per_s": round(ips["search"], 1), "plain_img_per_s": round(ips["plain"], 1),
        "ratio": round(ips["search"] / ips["plain"], 3),
        "round_ratios": [round(2 * p / s, 3) for p, s in zip(seconds["plain"],
                                                             seconds["search"], strict=True)],
        "search_ops": ops["search"], "plain_ops": ops["plain"], "paper_ops": ops["paper"],
        "ops_ratio": round(ops["search"] / ops["plain"], 2),
        "paper_img_per_s": round(ips["paper"], 1),
        "ratio_paper": round(ips["paper"] / ips["plain"], 3),
        "plain_cl_img_per_s": round(ips["plain_cl"], 1), "ratio_vs_channels_last": round(
            ips["search"] / ips["plain_cl"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--tau", type=float, default=5.0,
                        help="Gumbel temperature (5 = start of the search)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                        help="also time the search step under this mixed precision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for model in args.model:
        print(json.dumps(bench(model, args.batch, args.steps, args.rounds, args.tau,
                               args.resolution, args.classes, args.seed, args.device,
                               args.amp)), flush=True)


if __name__ == "__main__":
    main()
