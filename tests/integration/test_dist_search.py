"""The search under torchrun: 2 CPU processes (gloo) on a subset of the bundled demo data.

Slow (each launch starts two Python processes that import torch); CI runs them.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import network, supernet_from
from tasprune import Shape, count_flops
from tasprune._io import read_jsonl
from tasprune.checkpoint import load_checkpoint
from tasprune.export import read_shape
from tasprune.phase import stream
from tasprune.tas import searcher
from tasprune.tas.space import SearchSpace
from tasprune.tas.supernet import SuperNet

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]

SRC = Path(searcher.__file__).parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2"]
TIMING = ("seconds", "images_per_s")


def _env() -> dict[str, str]:
    # one thread per process: the machine may be small and shared
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}




def _search_args(data: str, out: Path, *extra: str) -> list[str]:
    return ["-m", "tasprune", "search", "--model", "resnet8", "--data", data,
            "--flops-ratio", "0.5", "--epochs", "2", "--batch-size", "16", "--out", str(out),
            "--quiet", "--device", "cpu", *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, demo_subset) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("torchrun")
    done = _run([*TORCHRUN, *_search_args(demo_subset, out, "--checkpoint-every", "5")])
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_torchrun_search_writes_once_and_keeps_the_ranks_identical(two_process_run):
    out, done = two_process_run
    assert done.stdout.count("searched") == 1  # rank 0 reports, once
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["phase"] for r in records] == ["search", "search", "derive"]
    for r in records[:2]:
        # both ranks hold the same logits, hence derive the same shape, at every epoch end
        assert r["rank_logit_max_diff"] == 0.0
        assert 0 <= r["train_acc"] <= 1 and np.isfinite(r["train_loss"])
    shape = read_shape(out / "shape.json")
    assert list(shape.blocks) == records[-1]["blocks"]
    state = load_checkpoint(out / "search.pt")
    assert (state["epoch"], state["step"], state["epoch_state"]) == (2, 0, None)
    assert (out / "search.prev.pt").is_file()
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.jsonl", "search.prev.pt", "search.pt", "shape.json"]  # no temp files left
    net = supernet_from(Shape.full("resnet8", num_classes=10, in_channels=1, resolution=14),
                        free=False)  # the default: coupled residual widths
    net.load_state_dict(state["supernet"])
    # the argmax of the saved logits is the last search line's; the shape is it, filled
    assert list(net.derive().blocks) == records[1]["blocks"]
    assert count_flops(net.derive()) == records[-1]["argmax_flops"] == records[1]["argmax_flops"]
    assert count_flops(shape) == records[-1]["flops"]


def test_torchrun_sigterm_saves_and_the_resume_matches(tmp_path, demo_subset, two_process_run):
    proc = subprocess.Popen([*TORCHRUN, *_search_args(demo_subset, tmp_path,
                                                      "--checkpoint-every", "3")],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    end = time.monotonic() + 180
    while not (tmp_path / "search.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # each rank prints its line (the two may interleave on the shared stderr)
    stops = re.findall(r"stopped by SIGTERM at (epoch \d+ step \d+) of \d+; checkpoint "
                       r"saved to (\S+);", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]  # same step on both ranks
    assert stops[0][1] == str(tmp_path / "search.pt")
    state = load_checkpoint(tmp_path / "search.pt")
    assert state["step"] > 0 and state["epoch_state"]["world_size"] == 2
    assert stops[0][0] == f"epoch {state['epoch'] + 1} step {state['step']}"

    done = _run([*TORCHRUN, *_search_args(demo_subset, tmp_path, "--resume")])
    assert done.returncode == 0, done.stderr[-3000:]
    reference, _ = two_process_run
    a = load_checkpoint(reference / "search.pt")["supernet"]
    b = load_checkpoint(tmp_path / "search.pt")["supernet"]
    # the per-rank BatchNorm running statistics are rank 0's after a resume (they play no
    # part in the search); everything else continues exactly
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k)
    assert read_shape(reference / "shape.json") == read_shape(tmp_path / "shape.json")
    ra, rb = read_jsonl(reference / "metrics.jsonl"), read_jsonl(tmp_path / "metrics.jsonl")
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for key in x.keys() - set(TIMING):  # partial sums are added in another order
            same = pytest.approx(x[key], rel=1e-12) if isinstance(x[key], float) else x[key]
            assert y[key] == same, key


_COMPARE = textwrap.dedent("""
    import dataclasses, os, sys
    import torch
    from tasprune import Shape
    from tasprune.data import load_data
    from tasprune.data.source import TensorImages
    from tasprune.tas import searcher

    data = load_data(sys.argv[1])
    n = 96  # halves of 48 images: 2 steps of 16 (8 per rank)
    data = dataclasses.replace(
        data, train=TensorImages(data.train.images[:n], data.train.labels[:n]),
        transform=dataclasses.replace(data.transform, pad=0, flip=False))  # no augmentation
    finish = searcher._finish

    def keep_every_rank(loop, *args):  # test hook: each rank's final weights
        torch.save(loop.net.state_dict(),
                   f"{sys.argv[2]}/rank{os.environ.get('RANK', '0')}.pt")
        return finish(loop, *args)

    searcher._finish = keep_every_rank
    full = Shape.full("resnet8", num_classes=10, in_channels=1, resolution=data.resolution)
    config = searcher.SearchConfig(flops_ratio=0.5, epochs=1, batch_size=16, device="cpu")
    searcher.search(full, data, config, sys.argv[2], quiet=True)
""")


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, demo_subset):
    script = tmp_path / "compare.py"
    script.write_text(_COMPARE)
    one, two = tmp_path / "one", tmp_path / "two"
    for cmd, out in (([sys.executable], one), (TORCHRUN, two)):
        out.mkdir()
        done = _run([*cmd, str(script), demo_subset, str(out)])
        assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    # averaged gradients of both steps + the same Gumbel draws: the ranks' weights and
    # logits are identical (only the BatchNorm running statistics are per rank)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0 if "running" not in k)
    assert not all(torch.equal(rank0[k], rank1[k]) for k in rank0 if "running" in k)

    single = torch.load(one / "rank0.pt")
    model, plan = network("resnet8", 10, 1, 14, free=False)
    start = SuperNet(SearchSpace.from_plan(plan), model, stream(0, "search.supernet")).state_dict()
    # Same global batches, same Gumbel draws, no augmentation: what differs is BatchNorm,
    # whose batch statistics come from 8 images per rank instead of 16. That changes the
    # conv gradients a lot (their movement differs by ~50%), so the sharp comparison is
    # on the logits, where the FLOP loss (identical given identical logits) and the
    # cross-entropy share the gradient: their movement differed by 1.8% (cosine 0.9998)
    # when measured; 10% leaves room for other machines' rounding.
    moved_one = single["width_logits"] - start["width_logits"]
    moved_two = rank0["width_logits"] - start["width_logits"]
    assert moved_one.norm() > 0
    assert (moved_two - moved_one).norm() < 0.1 * moved_one.norm()
    assert torch.nn.functional.cosine_similarity(moved_one.flatten(), moved_two.flatten(),
                                                 dim=0) > 0.99
    r1, r2 = read_jsonl(one / "metrics.jsonl")[0], read_jsonl(two / "metrics.jsonl")[0]
    # global metrics: the mean over the same 2 x 16 images (measured difference 0.012: the
    # default search trains one sampled sub-network per step, whose BatchNorm statistics
    # over 8 images per rank move the loss more than the paper's mixtures did, 1.3e-4)
    assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=0.03)
    assert r2["steps_below_band"] + r2["steps_in_band"] + r2["steps_above_target"] == 2
    assert r2["rank_logit_max_diff"] == 0.0 and "rank_logit_max_diff" not in r1


def test_torchrun_searches_a_zoo_network(tmp_path, demo_subset):
    # MobileNetV2 (depthwise convs, inverted residuals): the same loop, the same agreement
    out = tmp_path / "mnv2"
    args = _search_args(demo_subset, out, "--epochs", "1", "--health-images", "60")
    args[args.index("resnet8")] = "mobilenet_v2"
    done = _run([*TORCHRUN, *args])
    assert done.returncode == 0, done.stderr[-3000:]
    search, derive = read_jsonl(out / "metrics.jsonl")
    assert search["rank_logit_max_diff"] == 0.0 and np.isfinite(search["train_loss"])
    shape = read_shape(out / "shape.json")
    assert shape.plan.source.name == "mobilenet_v2"
    assert count_flops(shape) == derive["flops"]
