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
from torch import nn

from tasprune.latency import Forward, random_input

# (conv, bn) attribute pairs of the ResNet modules: stem, blocks, projection shortcut
_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("conv", "bn"))


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
    """An eval-only copy of `model` with every BatchNorm2d folded into the Conv2d before it.

    The folded convs replace the originals under the same names (with a bias), the BN
    layers become `nn.Identity`; parameters do not require grad. Works on
    `tasprune.models.ResNet` (stem, blocks, projection shortcuts with or without BN; the
    copy keeps `.shape`); a BatchNorm2d left over (one not directly after its conv in a
    known pair) is an error, not a silently unfolded layer.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        for conv_name, bn_name in _PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fold_conv_bn(conv, bn))
                setattr(module, bn_name, nn.Identity())
    left = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise ValueError(f"fold_batchnorm: no conv to fold BatchNorm {left[0]!r} into (only "
                         "tasprune ResNet layouts are known)")
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
