"""`tasprune train` on synthetic data without augmentation, for torchrun in test_dist_train.py.

    torchrun --standalone --nproc_per_node 2 tests/integration/dist_train_worker.py train ...

The arguments are the CLI's (`--data` is ignored: the data is `synthetic_bundle()` with
crop and flip off, so a step's images do not depend on the augmentation draws).
TEST_FAULT="KIND RANK STEP" injects a fault on one rank at one optimiser step of the
run: KIND "signal" sends SIGTERM to that rank, "nan" makes its loss NaN. Each rank
prints "rank R exit status N" when the CLI returns.
"""

import dataclasses
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import dist_data  # noqa: E402
from tasprune import cli  # noqa: E402
from tasprune.commands import _common  # noqa: E402
from tasprune.training import loop  # noqa: E402


def _inject(kind: str, rank: int, step: int) -> None:
    if int(os.environ["RANK"]) != rank:
        return
    real = loop.distill_loss
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        parts = real(*args, **kwargs)
        if calls["n"] == step:
            if kind == "signal":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                return dataclasses.replace(parts, total=parts.total * torch.nan)
        return parts

    loop.distill_loss = faulty


if __name__ == "__main__":
    torch.set_num_threads(1)
    if os.environ.get("TEST_FAULT"):
        kind, rank, step = os.environ["TEST_FAULT"].split()
        _inject(kind, int(rank), int(step))
    _common.get_data = lambda spec, quiet=True: dist_data()
    code = cli.main(sys.argv[1:])
    # torchrun terminates the other workers once one has exited non-zero, so the test
    # reads each rank's exit status here, not from torchrun's report
    print(f"rank {os.environ['RANK']} exit status {code}", file=sys.stderr, flush=True)
    sys.exit(code)
