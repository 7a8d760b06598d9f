"""The pieces of the searchable network: what one forward pass takes from the width and
depth distributions (`Choice`, `Arch`), the per-choice BatchNorm (`ChoiceBN`) and the
mixing of candidates of different widths.

A candidate j of a group takes the first `c_j` channels of the group's widest candidate
`c_max`, applies its own BatchNorm, and is resized to `c_max`: by channel-wise
interpolation (CWI, the paper's: adaptive average pooling along channels,
`interp_matrix`) or, with `pad`, zero-padding (channel i stays channel i). BatchNorm and
either resize are per-channel affine maps plus a fixed channel matrix, so a group's
candidates collapse into one normalisation and one `c_max x c_max` 1x1 convolution.
Candidates whose mixing weight is exactly zero are dropped before `c_max` is computed
(they contribute nothing): at one-hot logits the sampled forward is exactly the pruned
network's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.1  # nn.BatchNorm2d defaults, as the pruned network
BN_EPS = 1e-5


# channel-wise interpolation ------------------------------------------------------------
_INTERP_CACHE: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}


def interp_matrix(c_in: int, c_out: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[c_out, c_in] matrix of adaptive average pooling along channels.

    Output channel i averages input channels floor(i*c_in/c_out) .. ceil((i+1)*c_in/c_out)-1.
    """
    key = (c_in, c_out, dtype, torch.device(device))
    if key not in _INTERP_CACHE:
        m = torch.zeros(c_out, c_in, dtype=torch.float64)
        for i in range(c_out):
            lo, hi = (i * c_in) // c_out, -(-((i + 1) * c_in) // c_out)
            m[i, lo:hi] = 1.0 / (hi - lo)
        _INTERP_CACHE[key] = m.to(dtype=dtype, device=device)
    return _INTERP_CACHE[key]


def channel_interp(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Resize the channel axis (dim 1) of x to `channels` by adaptive average pooling."""
    if x.shape[1] == channels:
        return x
    m = interp_matrix(x.shape[1], channels, x.dtype, x.device)
    return F.conv2d(x, m[:, :, None, None]) if x.dim() == 4 else x @ m.T


# architectures -------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """The candidates one distribution contributes to one forward pass.

    `values`: their widths (or block counts); `rows`: their choice indices;
    `weights`: mixing weights [n], or None for a single candidate (weight 1);
    `pad`: candidates are brought to the widest by zero-padding their channels
    instead of channel-wise interpolation (see `resize_matrix`).
    """

    values: tuple[int, ...]
    rows: tuple[int, ...]
    weights: torch.Tensor | None = None
    pad: bool = False
    gate: bool = False  # depths: the nested relaxation (see tasprune.tas.supernet)

    @property
    def max(self) -> int:
        return max(self.values)


@dataclass(frozen=True)
class Arch:
    """What one forward pass uses: a Choice per searched group and per stage."""

    widths: tuple[Choice, ...]
    depths: tuple[Choice, ...]

    @classmethod
    def fixed(cls, space: Any, shape: Any) -> Arch:
        """The deterministic architecture of a shape of `space` (one candidate each)."""
        wi, di = space.indices_of(shape)
        widths = tuple(Choice((space.widths[s][i],), (i,)) for s, i in enumerate(wi))
        depths = tuple(Choice((space.depths[s][i],), (i,)) for s, i in enumerate(di))
        return cls(widths, depths)


def sampled_choices(values: tuple[tuple[int, ...], ...], index: torch.Tensor, weight: torch.Tensor,
             pad: bool = False) -> tuple[Choice, ...]:
    """Per-row Choices of sampled (index, weight), dropping candidates of weight exactly 0."""
    idx, keep = index.tolist(), (weight > 0).tolist()  # the one host sync of a sample
    out = []
    for r, (row_idx, row_keep) in enumerate(zip(idx, keep, strict=True)):
        pos = [p for p, k in enumerate(row_keep) if k]
        rows = tuple(row_idx[p] for p in pos)
        vals = tuple(values[r][i] for i in rows)
        if len(pos) == 1:
            out.append(Choice(vals, rows))
        else:
            w = weight[r] if len(pos) == len(row_keep) else weight[r, pos]
            out.append(Choice(vals, rows, w, pad))
    return tuple(out)


# layers --------------------------------------------------------------------------------
class ChoiceBN(nn.Module):
    """One BatchNorm per width choice, stored padded: row j holds choice j's channels."""

    def __init__(self, choices: tuple[int, ...], channels: int) -> None:
        super().__init__()
        self.choices = choices
        self.weight = nn.Parameter(torch.ones(len(choices), channels))
        self.bias = nn.Parameter(torch.zeros(len(choices), channels))
        self.register_buffer("running_mean", torch.zeros(len(choices), channels))
        self.register_buffer("running_var", torch.ones(len(choices), channels))

    def forward(self, y: torch.Tensor, choice: Choice) -> torch.Tensor:
        """BN of every candidate on its first channels, resized to c_max, mixed.

        Always in float32: under mixed precision the statistics and the mixing stay
        exact, and the next conv casts back down."""
        if torch.is_autocast_enabled(y.device.type):
            with torch.autocast(y.device.type, enabled=False):
                return self._forward(y.float(), choice)
        return self._forward(y, choice)

    def _forward(self, y: torch.Tensor, choice: Choice) -> torch.Tensor:
        c_max = y.shape[1]
        if choice.weights is None:
            j = choice.rows[0]
            return F.batch_norm(y, self.running_mean[j, :c_max], self.running_var[j, :c_max],
                                self.weight[j, :c_max], self.bias[j, :c_max], self.training,
                                BN_MOMENTUM, BN_EPS)
        rows = _index(choice.rows, y.device)
        scale, shift = self.weight[rows, :c_max], self.bias[rows, :c_max]
        if not self.training:  # running statistics: BN is a per-channel affine map
            scale = scale * torch.rsqrt(self.running_var[rows, :c_max] + BN_EPS)
            shift = shift - self.running_mean[rows, :c_max] * scale
            mix, bias = mixing(choice, scale, shift)
            return F.conv2d(y, mix[:, :, None, None], bias)
        mix, bias = mixing(choice, scale, shift)
        out, mean, var = _NormMix.apply(y, mix, bias)
        with torch.no_grad():  # every candidate's running stats see the batch statistics
            n = y.numel() // c_max
            var = var * (n / max(n - 1, 1))
            for j, c in zip(choice.rows, choice.values, strict=True):
                self.running_mean[j, :c].lerp_(mean[:c], BN_MOMENTUM)
                self.running_var[j, :c].lerp_(var[:c], BN_MOMENTUM)
        return out


class _NormMix(torch.autograd.Function):
    """Training-mode BatchNorm without affine followed by a channel mixing, in one op:
    out = mix @ ((y - mean) / sqrt(var + eps)) + bias over the channel axis.

    Fused because the separate normalisation and 1x1 convolution cost about twice
    the memory traffic on CPU: the normalisation is folded into the 1x1 weights and
    bias, so the normalised tensor is never stored. The batch statistics (mean,
    biased var) come back for the running stats. Backward uses the identities
    sum(g_xhat) = sum(g) @ mix and sum(g_xhat * xhat) = column sums of
    mix * (g^T xhat); g^T y and sum(g) are one weight-gradient call of the 1x1 conv.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, mix: torch.Tensor, bias: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = y.contiguous(memory_format=torch.channels_last)
        mean, var = torch.batch_norm_update_stats(y, None, None, 1.0)
        invstd = torch.rsqrt(var + BN_EPS)
        wmat = mix * invstd
        out = F.conv2d(y, wmat[:, :, None, None], bias - wmat @ mean)
        ctx.save_for_backward(y, mix, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _gm: torch.Tensor, _gv: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        y, mix, mean, invstd = ctx.saved_tensors
        n = y.numel() // y.shape[1]
        grad = grad.contiguous(memory_format=torch.channels_last)
        _, g_y, gsum = torch.ops.aten.convolution_backward(  # g^T y and sum(g), one pass
            grad, y, mix[:, :, None, None], [mix.shape[0]], [1, 1], [0, 0], [1, 1], False,
            [0, 0], 1, [False, True, True])
        gram = (g_y.flatten(1) - gsum[:, None] * mean[None, :]) * invstd  # g^T xhat
        grad_y = None
        if ctx.needs_input_grad[0]:
            mean_gx = (gsum @ mix) / n  # per-channel mean of g_xhat
            alpha = invstd * invstd * (mix * gram).sum(0) / n
            wt = (mix * invstd).t().contiguous()
            grad_y = F.conv2d(grad, wt[:, :, None, None], alpha * mean - invstd * mean_gx)
            grad_y = grad_y.contiguous(memory_format=torch.channels_last)
            _rows(grad_y).addcmul_(_rows(y), alpha, value=-1.0)
        return grad_y, gram, gsum


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[pixels, channels] view of a channels-last [B, C, H, W] tensor (shares memory)."""
    return x.permute(0, 2, 3, 1).view(-1, x.shape[1])


_INDEX_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
_RESIZE_CACHE: dict[tuple[tuple[int, ...], torch.dtype, torch.device, bool], torch.Tensor] = {}


def _index(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A cached index tensor of choice rows (saves building one per slot and forward)."""
    key = (rows, device)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = torch.tensor(rows, dtype=torch.long, device=device)
    return _INDEX_CACHE[key]


def resize_matrix(c_in: int, c_out: int, pad: bool, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[c_out, c_in]: channel-wise interpolation (`interp_matrix`), or with `pad` the
    identity on the first c_in channels and zeros after (channel i stays channel i)."""
    if not pad:
        return interp_matrix(c_in, c_out, dtype, device)
    return torch.eye(c_out, c_in, dtype=dtype, device=device)


def _resizers(values: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              pad: bool = False) -> torch.Tensor:
    """[n, c_max, c_max]: candidate n's channel resize c_n -> c_max (zero columns past c_n)."""
    key = (values, dtype, device, pad)
    if key not in _RESIZE_CACHE:
        c_max = max(values)
        out = torch.zeros(len(values), c_max, c_max, dtype=dtype, device=device)
        for n, c in enumerate(values):
            out[n, :, :c] = resize_matrix(c, c_max, pad, dtype, device)
        _RESIZE_CACHE[key] = out
    return _RESIZE_CACHE[key]


def mixing(choice: Choice, scale: torch.Tensor, shift: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Matrix [c_max, c_max] and bias of sum_n w_n * resize_n(scale_n * x[:c_n] + shift_n).

    scale, shift: [n, c_max] per candidate (entries past c_n are ignored)."""
    assert choice.weights is not None
    weighted = (_resizers(choice.values, scale.dtype, scale.device, choice.pad)
                * choice.weights[:, None, None])
    mix = (weighted * scale[:, None, :]).sum(0)
    bias = None if shift is None else torch.einsum("nic,nc->i", weighted, shift)
    return mix, bias


