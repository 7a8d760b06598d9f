"""The searchable network: one ResNet of any registered family whose widths and
depths are distributions.

It is built by walking the family's skeleton (`tasprune.families`), the same
table the pruned `ResNet` and the FLOP counter read, so no architecture is
written twice. Per conv slot it holds the full-size conv weight and one
BatchNorm per width choice; per stage a distribution over block counts; every
block has a full-size projection shortcut (sliced at run time) that is used
exactly where the pruned network of `tasprune.models` has one: at stride 2
always, at stride 1 when the block's input width differs from its output width.

A forward pass takes an `Arch` (sampled by `SuperNet.sample`, the noise-free
`SuperNet.expected`, or fixed from a Shape) and, per slot:

* computes the conv only for the `c_max` output channels of the widest
  candidate and only the input channels present (sliced weights, no padding);
* candidate j takes the first `c_j` channels, applies its own BatchNorm, is
  resized to `c_max` channels, and the resized candidates are summed with their
  mixing weights. The resize is channel-wise interpolation (CWI, the paper's:
  adaptive average pooling along channels, `interp_matrix`) or, with `pad`,
  zero-padding (channel i stays channel i). BatchNorm and either resize are
  per-channel affine maps plus a fixed channel matrix, so they collapse into one
  normalisation and one `c_max x c_max` 1x1 convolution per slot;
* a stage's output is the weighted sum over depth choices of the output after
  block d, each resized to the widest of them; or, for `gate` choices, the
  nested relaxation of `_gated_stage_forward`.

Candidates whose mixing weight is exactly zero are dropped before `c_max` is
computed (they contribute nothing to the sum): this keeps the sampled forward
exact in the limit of one-hot logits, where the network equals the pruned
`ResNet` of the argmax shape with the weights of `state_dict_for(shape)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasprune.families import BlockSpec
from tasprune.shape import Shape
from tasprune.tas.sampling import gumbel_softmax, gumbel_topk, masked_softmax
from tasprune.tas.space import SearchSpace

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
    gate: bool = False  # depths: the nested relaxation (`_gated_stage_forward`)

    @property
    def max(self) -> int:
        return max(self.values)


@dataclass(frozen=True)
class Arch:
    """What one forward pass uses: a Choice per conv slot and per stage."""

    widths: tuple[Choice, ...]
    depths: tuple[Choice, ...]

    @classmethod
    def fixed(cls, space: SearchSpace, shape: Shape) -> Arch:
        """The deterministic architecture of a Shape of this space (one candidate each)."""
        wi, di = space.indices_of(shape)
        widths = tuple(Choice((space.widths[s][i],), (i,)) for s, i in enumerate(wi))
        depths = tuple(Choice((space.depths[s][i],), (i,)) for s, i in enumerate(di))
        return cls(widths, depths)


def _choices(values: tuple[tuple[int, ...], ...], index: torch.Tensor, weight: torch.Tensor,
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
            mix, bias = _mixing(choice, scale, shift)
            return F.conv2d(y, mix[:, :, None, None], bias)
        mix, bias = _mixing(choice, scale, shift)
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


def _mixing(choice: Choice, scale: torch.Tensor, shift: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Matrix [c_max, c_max] and bias of sum_n w_n * resize_n(scale_n * x[:c_n] + shift_n).

    scale, shift: [n, c_max] per candidate (entries past c_n are ignored)."""
    assert choice.weights is not None
    weighted = (_resizers(choice.values, scale.dtype, scale.device, choice.pad)
                * choice.weights[:, None, None])
    mix = (weighted * scale[:, None, :]).sum(0)
    bias = None if shift is None else torch.einsum("nic,nc->i", weighted, shift)
    return mix, bias


class SlotConv(nn.Module):
    """A full-size conv whose output width is a searched slot, with per-choice BN.

    `pool` puts a 2x2 average pool (ceil mode) before a stride-1 conv: the strided
    projection shortcut of `tasprune.models.blocks.Projection`.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int,
                 choices: tuple[int, ...], bn: bool = True, pool: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        self.stride, self.padding, self.pool = stride, kernel // 2, pool
        self.bn = ChoiceBN(choices, out_ch) if bn else None

    def forward(self, x: torch.Tensor, choice: Choice) -> torch.Tensor:
        if self.pool:
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        w = self.weight[: choice.max, : x.shape[1]]
        if self.bn is not None:
            return self.bn(F.conv2d(x, w, None, self.stride, self.padding), choice)
        if choice.weights is not None:
            # no BN between: fold the candidates' resize-and-mix into the weight
            mix, _ = _mixing(choice, w.new_ones(len(choice.values), choice.max), None)
            w = torch.einsum("oc,cikl->oikl", mix, w)
        return F.conv2d(x, w, None, self.stride, self.padding)


class SuperBlock(nn.Module):
    """A residual block (basic or bottleneck) with searched widths and a projection."""

    def __init__(self, spec: BlockSpec, in_ch: int, widths: tuple[int, ...],
                 choices: tuple[tuple[int, ...], ...]) -> None:
        super().__init__()
        self.spec = spec
        convs, cin = [], in_ch
        for conv, width in zip(spec.convs, widths, strict=True):
            convs.append(SlotConv(cin, width, conv.kernel, conv.stride, choices[conv.slot]))
            cin = width
        self.convs = nn.ModuleList(convs)
        bn = spec.shortcut_bn or spec.stride == 1  # as models.blocks
        self.downsample = SlotConv(in_ch, widths[-1], 1, 1, choices[spec.out_slot], bn=bn,
                                   pool=spec.stride > 1)

    def forward(self, x: torch.Tensor, widths: tuple[Choice, ...]) -> torch.Tensor:
        out = x
        last = len(self.convs) - 1
        for j, (conv, spec) in enumerate(zip(self.convs, self.spec.convs, strict=True)):
            out = conv(out, widths[spec.slot])
            if j < last:
                out = F.relu(out, inplace=True)
        if self.spec.stride > 1 or x.shape[1] != out.shape[1]:
            shortcut = self.downsample(x, widths[self.spec.out_slot])
        else:
            shortcut = x
        return F.relu(out + shortcut, inplace=True)


# the distributions ---------------------------------------------------------------------
class Distributions(nn.Module):
    """The architecture logits of a space (`widths`, `depths`, `ties` per row), what is
    sampled from them and their argmax: shared by the ResNet `SuperNet` and the
    `PlanSuperNet` of any planned network."""

    space: Any

    def _init_distributions(self, space: Any) -> None:
        self.space = space
        wmask, dmask = _mask(space.widths), _mask(space.depths)
        # logits of every slot (stage) in one padded matrix; the masks mark real choices
        self.register_buffer("width_mask", wmask, persistent=False)
        self.register_buffer("depth_mask", dmask, persistent=False)
        self.width_logits = nn.Parameter(torch.zeros(wmask.shape))
        # a tied slot reads the row of the slot it is tied to (search.space, `coupled`)
        self.register_buffer("ties", torch.tensor(space.ties), persistent=False)
        self.depth_logits = nn.Parameter(torch.zeros(dmask.shape))

    def _reset_logits(self, generator: torch.Generator | None) -> None:
        """Architecture logits from N(0, 0.01^2) (TAS)."""
        with torch.no_grad():
            for logits, mask in ((self.width_logits, self.width_mask),
                                 (self.depth_logits, self.depth_mask)):
                logits.normal_(0.0, 0.01, generator=generator).mul_(mask)

    # parameters ------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture logits (optimised by Adam on the valid half)."""
        return [self.width_logits, self.depth_logits]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Everything else: convs, BNs, classifier (optimised by SGD on the train half)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    # architectures ---------------------------------------------------------------------
    def slot_width_logits(self) -> torch.Tensor:
        """Width logits of every slot: a tied slot's row is the one of the slot it is tied
        to (the rows of tied slots themselves are never read)."""
        return self.width_logits[self.ties] if self.space.coupled else self.width_logits

    def searched_width_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and mask of the width rows that are searched (every slot's own row, or
        with tied slots, one row per stream): what an entropy or a log sees once each."""
        if not self.space.coupled:
            return self.width_logits, self.width_mask
        rows = [s for s, t in enumerate(self.space.ties) if s == t]
        return self.width_logits[rows], self.width_mask[rows]

    def sample(self, tau: float, k: int = 2, generator: torch.Generator | None = None,
               pad: bool = False) -> Arch:
        """Fresh Gumbel samples of every width (top-k) and depth (soft) distribution;
        `pad`: mix candidates by zero-padding instead of channel-wise interpolation."""
        top = gumbel_topk(self.width_logits, self.width_mask, tau, k, generator)
        index, weight = top.index, top.weight
        if self.space.coupled:  # one draw per stream
            index, weight = index[self.ties], weight[self.ties]
        widths = _choices(self.space.widths, index, weight, pad)
        probs = gumbel_softmax(self.depth_logits, self.depth_mask, tau, generator)
        order = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
        return Arch(widths, _choices(self.space.depths, order, probs, pad))

    def expected(self) -> Arch:
        """Every choice of every distribution weighted by its probability, no noise: conv
        slot l outputs channel i scaled by P(c_l > i) (zero-padded candidates), and the
        depths take the nested relaxation of `_gated_stage_forward`."""
        arch = []
        for logits, mask, values in ((self.slot_width_logits(), self.width_mask,
                                      self.space.widths),
                                     (self.depth_logits, self.depth_mask, self.space.depths)):
            probs = masked_softmax(logits, mask)
            order = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
            arch.append(_choices(values, order, probs, pad=True))
        depths = tuple(dataclasses.replace(c, gate=True) for c in arch[1])
        return Arch(widths=arch[0], depths=depths)

    def argmax_indices(self) -> tuple[list[int], list[int]]:
        """The most probable choice of every slot and stage."""
        def best(logits: torch.Tensor, mask: torch.Tensor) -> list[int]:
            return logits.detach().masked_fill(~mask, float("-inf")).argmax(dim=1).tolist()
        return (best(self.slot_width_logits(), self.width_mask),
                best(self.depth_logits, self.depth_mask))

    def derive(self) -> Shape:
        """The argmax shape: the most probable width of every slot and depth of every stage."""
        return self.space.shape(*self.argmax_indices())


# the network ---------------------------------------------------------------------------
class SuperNet(Distributions):
    """The searchable ResNet of a SearchSpace (see the module docstring)."""

    def __init__(self, space: SearchSpace, generator: torch.Generator | None = None) -> None:
        super().__init__()
        full = space.full
        skel = full.skeleton
        fw = full.widths
        self.stem = SlotConv(full.in_channels, fw[0], skel.stem.kernel, skel.stem.stride,
                             space.widths[0])
        self.stem_pool = skel.family.stem_pool
        stages, cin = [], fw[0]
        for stage in skel.stages:
            blocks = []
            for blk in stage:
                widths = tuple(fw[c.slot] for c in blk.convs)
                blocks.append(SuperBlock(blk, cin, widths, space.widths))
                cin = widths[-1]
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, full.num_classes)
        self._init_distributions(space)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """He et al. 2015 init for convs (as the pruned ResNet), BN 1/0, the Linear default
        for the classifier, architecture logits from N(0, 0.01^2) (TAS)."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, SlotConv):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu",
                                            generator=generator)
                elif isinstance(m, ChoiceBN):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                    m.running_mean.zero_()
                    m.running_var.fill_(1.0)
            nn.init.kaiming_uniform_(self.fc.weight, a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(self.fc.in_features)
            nn.init.uniform_(self.fc.bias, -bound, bound, generator=generator)
        self._reset_logits(generator)

    # forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, arch: Arch | None = None) -> torch.Tensor:
        """Class logits under `arch` (default: the fixed argmax shape)."""
        if arch is None:
            arch = Arch.fixed(self.space, self.derive())
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.stem(x, arch.widths[0]), inplace=True)
        if self.stem_pool:
            x = F.max_pool2d(x, 3, 2, 1)
        for blocks, depth in zip(self.stages, arch.depths, strict=True):
            x = _stage_forward(blocks, x, arch.widths, depth)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.linear(x, self.fc.weight[:, : x.shape[1]], self.fc.bias)

    # weights in and out ----------------------------------------------------------------
    def subnet(self, shape: Shape) -> nn.Module:
        """The pruned network of `shape` with these weights, on this supernet's device."""
        from tasprune.models import build_model

        model = build_model(shape).to(self.width_logits.device)
        model.load_state_dict(self.state_dict_for(shape))
        return model.to(memory_format=torch.channels_last)

    def state_dict_for(self, shape: Shape) -> dict[str, torch.Tensor]:
        """The state dict of `tasprune.models.build_model(shape)` cut from these weights:
        sliced convs, projections and classifier, the BN of each slot's chosen width."""
        out: dict[str, torch.Tensor] = {}
        for e in _entries(self, shape):
            if e.tensor is None:
                out[e.key] = torch.tensor(0, dtype=torch.long)
            else:
                out[e.key] = e.tensor[e.index].detach().clone()
        return out

    def load_teacher(self, state: Mapping[str, torch.Tensor]) -> None:
        """Initialise from the state dict of the unpruned ResNet: convs, projections and the
        classifier, and every width choice's BN from the first channels of the teacher's BN."""
        full = self.space.full
        entries = list(_entries(self, full))
        expected = {e.key for e in entries}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"teacher state dict does not fit the unpruned {full.describe()} with "
                f"{full.num_classes} classes: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for e in entries:
                if e.tensor is None:
                    continue
                want = tuple(e.tensor[e.index].shape)
                got = state[e.key]
                if tuple(got.shape) != want:
                    raise ValueError(
                        f"teacher {e.key} has shape {tuple(got.shape)}, expected {want} (the "
                        f"unpruned {full.describe()}, {full.num_classes} classes, "
                        f"{full.in_channels} input channels)"
                    )
                if e.bn_choices is None:
                    e.tensor[e.index].copy_(got)
                else:
                    for row, c in enumerate(e.bn_choices):
                        e.tensor[row, :c].copy_(got[:c])


def _stage_forward(blocks: nn.ModuleList, x: torch.Tensor, widths: tuple[Choice, ...],
                   depth: Choice) -> torch.Tensor:
    """Run the first max(d) blocks; mix the outputs after each depth candidate d."""
    if depth.gate and depth.weights is not None:
        return _gated_stage_forward(blocks, x, widths, depth)
    outs: dict[int, torch.Tensor] = {}
    for b in range(depth.max):
        x = blocks[b](x, widths)
        if b + 1 in depth.values:
            outs[b + 1] = x
    if depth.weights is None:
        return x
    widest = max(o.shape[1] for o in outs.values())
    total: torch.Tensor | None = None
    for n, d in enumerate(depth.values):
        o, p = outs[d], depth.weights[n]
        if o.shape[1] == widest:
            term = o * p
        else:
            a = resize_matrix(o.shape[1], widest, depth.pad, o.dtype, o.device)
            term = F.conv2d(o, (a * p)[:, :, None, None])
        total = term if total is None else total + term
    assert total is not None
    return total


def _gated_stage_forward(blocks: nn.ModuleList, x: torch.Tensor, widths: tuple[Choice, ...],
                         depth: Choice) -> torch.Tensor:
    """The nested relaxation of a depth distribution: the blocks between two consecutive
    candidates d_i < d_(i+1) form a group that is kept with probability
    q_i = P(d >= d_(i+1)) / P(d >= d_i) given the blocks before it, and the stage computes
    y <- y + q_i * (group(y) - y), group by group (narrower tensors zero-padded)."""
    order = sorted(range(len(depth.values)), key=lambda n: depth.values[n])
    values = [depth.values[n] for n in order]
    assert depth.weights is not None
    probs = depth.weights[order]
    keep = probs.flip(0).cumsum(0).flip(0)  # keep[i] = P(d >= values[i])
    for b in range(values[0]):
        x = blocks[b](x, widths)
    for i in range(1, len(values)):
        z = x
        for b in range(values[i - 1], values[i]):
            z = blocks[b](z, widths)
        q = keep[i] / keep[i - 1].clamp_min(1e-12)
        if z.shape[1] != x.shape[1]:
            c = max(z.shape[1], x.shape[1])
            x, z = (F.pad(t, (0, 0, 0, 0, 0, c - t.shape[1])) for t in (x, z))
        x = x + q * (z - x)
    return x


def _mask(choices: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """[rows, max choices] mask of the real entries of a ragged list of choices."""
    mask = torch.zeros(len(choices), max((len(c) for c in choices), default=1), dtype=torch.bool)
    for r, c in enumerate(choices):
        mask[r, : len(c)] = True
    return mask


@dataclass(frozen=True)
class _Entry:
    """One tensor of the pruned ResNet's state dict: `tensor[index]` of the supernet.

    `bn_choices` marks per-choice BN tensors (row = choice); `tensor` None marks
    `num_batches_tracked`."""

    key: str
    tensor: torch.Tensor | None
    index: tuple[int | slice, ...] = ()
    bn_choices: tuple[int, ...] | None = None


def _entries(net: SuperNet, shape: Shape) -> Iterator[_Entry]:
    """Walk the pruned ResNet of `shape` in state-dict order, naming where each tensor lives."""
    space = net.space
    wi, _ = space.indices_of(shape)

    def conv_bn(conv_key: str, bn_key: str | None, conv: SlotConv, slot: int, cin: int
                ) -> Iterator[_Entry]:
        c = shape.widths[slot]
        yield _Entry(f"{conv_key}.weight", conv.weight, (slice(0, c), slice(0, cin)))
        if bn_key is None or conv.bn is None:
            return
        row = wi[slot]
        bn = conv.bn
        for name in ("weight", "bias", "running_mean", "running_var"):
            yield _Entry(f"{bn_key}.{name}", getattr(bn, name), (row, slice(0, c)), bn.choices)
        yield _Entry(f"{bn_key}.num_batches_tracked", None)

    yield from conv_bn("conv1", "bn1", net.stem, 0, shape.in_channels)
    cin = shape.widths[0]
    for s, stage in enumerate(shape.skeleton.stages):
        for blk, sblock in zip(stage[: shape.blocks[s]], net.stages[s], strict=False):
            prefix = f"layer{s + 1}.{blk.index}"
            h = cin
            for j, (conv, sconv) in enumerate(zip(blk.convs, sblock.convs, strict=True)):
                yield from conv_bn(f"{prefix}.conv{j + 1}", f"{prefix}.bn{j + 1}", sconv,
                                   conv.slot, h)
                h = shape.widths[conv.slot]
            if blk.stride > 1 or cin != h:
                yield from conv_bn(f"{prefix}.downsample.conv", f"{prefix}.downsample.bn",
                                   sblock.downsample, blk.out_slot, cin)
            cin = h
    yield _Entry("fc.weight", net.fc.weight, (slice(None), slice(0, cin)))
    yield _Entry("fc.bias", net.fc.bias, (slice(None),))
