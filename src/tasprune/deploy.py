"""The deployable form of a model: BatchNorm folded into the convolutions, and its timing in
ONNX Runtime.

`model.safetensors` stays the training artifact (convs without bias, BatchNorm with
running statistics). For inference every Conv2d followed by its BatchNorm2d is one
Conv2d with a bias: in eval mode BN is a per-channel affine map,

    y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta,

so the conv weight is scaled by s = gamma / sqrt(var + eps) per output channel and
the bias becomes beta - s * mean. `fold_batchnorm` returns such a copy (eval only:
the BN layers are gone, so it cannot be trained further); `tasprune export --format
onnx` writes that form, and `OnnxRuntimeTarget` times an ONNX file with ONNX Runtime
next to PyTorch models in `tasprune.latency.paired_latency`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from tasprune.latency import Forward, random_input
from tasprune.net.surgery import set_module
from tasprune.net.trace import Tracer


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One Conv2d (with bias) computing `bn(conv(x))` of eval mode (running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics "
                         "(track_running_stats=False)")
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                      stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                      dilation=conv.dilation, groups=conv.groups, bias=True,  # type: ignore[arg-type]
                      padding_mode=conv.padding_mode, device=conv.weight.device,
                      dtype=conv.weight.dtype)
    with torch.no_grad():
        # in float64, so the folded net matches the unfolded one to float32 rounding
        var = bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
        fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(beta + (bias - bn.running_mean.double()) * scale)  # type: ignore[union-attr]
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-only copy of `model` with every BatchNorm2d folded into the Conv2d whose one
    consumer it is (found by tracing the forward with torch.fx). The folded convs replace
    the originals under the same names (with a bias), those BN layers become
    `nn.Identity`; a BatchNorm after anything else (a concatenation, an activation) stays
    as it is. Parameters do not require grad; the copy keeps the shape the model carries.
    """
    folded = copy.deepcopy(model).eval()
    try:
        graph = Tracer().trace(folded)
    except Exception as exc:  # noqa: BLE001 - any tracing error, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"fold_batchnorm: the network cannot be traced by torch.fx: "
                         f"{first}") from None
    modules = dict(folded.named_modules())
    for node in graph.nodes:
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        src = node.args[0] if node.args else None
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(src, fx.Node):
            continue
        conv = modules.get(str(src.target)) if src.op == "call_module" else None
        if isinstance(conv, nn.Conv2d) and len(src.users) == 1:
            set_module(folded, str(src.target), fold_conv_bn(conv, bn))
            set_module(folded, str(node.target), nn.Identity())
    folded.requires_grad_(False)
    return folded


def onnxruntime_missing() -> str | None:
    """Why ONNX Runtime timing cannot run here (a missing package), or None if it can."""
    for package in ("onnxruntime", "onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (pip install 'tasprune[dev]')"
    return None


class OnnxRuntimeTarget:
    """An ONNX file run by ONNX Runtime on the CPU, as a `tasprune.latency.Target`.

    The session uses the CPU execution provider with `threads` intra-op threads (the
    thread count of the PyTorch models it is timed against), one inter-op thread, and
    no spinning of idle threads: a pool spinning after its pass would take CPU from the
    model timed next.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._sessions: dict[int, Any] = {}

    def session(self, threads: int) -> Any:
        """The onnxruntime InferenceSession on `threads` intra-op threads (made once)."""
        if threads not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            self._sessions[threads] = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"])
        return self._sessions[threads]

    def prepare(self, batch: int, input_shape: tuple[int, int, int], threads: int,
                device: torch.device) -> Forward:
        if device.type != "cpu":
            raise ValueError(f"ONNX Runtime is timed on the CPU only, not {device}")
        session = self.session(threads)
        name = session.get_inputs()[0].name
        feed = {name: random_input(batch, input_shape).numpy()}
        run: Callable[[], object] = lambda: session.run(None, feed)  # noqa: E731
        return run
