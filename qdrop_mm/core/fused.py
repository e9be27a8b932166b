"""One-pass kernels for the reconstruction hot path: LSQ + drop, the input mix, soft rounding, the losses.

Each kernel is a pure tensor function (no autograd) that ``torch.compile``
turns into one loop over memory (inductor: C++ on CPU, Triton on GPU); the
autograd functions below pair a forward kernel with a backward kernel, so
autograd sees one node instead of a graph of temporaries. The drop mask is not
stored: it is a counter-based hash of (element index, a seed drawn per call),
recomputed in the backward pass, so no ``rand_like`` tensor is drawn or kept.

Tensors reach the kernels flattened (one dimension; weights as
channels x rest), so one compiled graph serves every shape. A kernel runs eagerly (same function, same numbers up to float rounding)
when its tensor is smaller than the kernel's ``min_numel`` (compile time would
not pay), inside an enclosing ``torch.compile`` (which traces it), or when
compiling it failed once (a warning says so and that kernel stays eager).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

ZETA = 1.1
GAMMA = -0.1


class Kernel:
    """A tensor function, compiled on first use for tensors of at least ``min_numel`` elements."""

    def __init__(self, fn: Callable, min_numel: int) -> None:
        self.fn = fn
        self.min_numel = min_numel
        self._compiled: Optional[Callable] = None
        self.failed = False

    def compiled(self) -> Callable:
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        return self._compiled

    def __call__(self, *args, compile: bool = True):
        if not compile or self.failed or torch.compiler.is_compiling() or \
                max(a.numel() for a in args if isinstance(a, Tensor)) < self.min_numel:
            return self.fn(*args)
        try:  # detached: no recompiles on requires_grad or on a Parameter's (static) shape
            return self.compiled()(*(a.detach() if isinstance(a, Tensor) else a for a in args))
        except Exception as err:  # noqa: BLE001  the eager function computes the same thing
            self.failed = True
            warnings.warn(f'torch.compile of {self.fn.__name__} failed ({type(err).__name__}: '
                          f'{str(err).splitlines()[0][:200] if str(err) else ""}); running it eagerly from here')
            return self.fn(*args)


MAX_NUMEL = 2 ** 31 - 1


def keep_threshold(keep_prob: float) -> int:
    """Threshold t on the signed 32-bit hash with P(hash < t) = keep_prob (keep_prob < 1)."""
    return min(int(round(keep_prob * 2 ** 32)) - 2 ** 31, 2 ** 31 - 1)


def draw_seed(device: torch.device) -> Tensor:
    """A fresh 31-bit seed from torch's generator, as a 0-d int32 tensor on ``device`` (no host sync)."""
    return torch.randint(2 ** 31 - 1, (), device=device, dtype=torch.int32)


def hash_i32(index: Tensor, seed: Tensor) -> Tensor:
    """Counter-based hash of (index, seed) to 32 uniform bits in int32 (multiplications wrap around).

    Two multiply-xorshift rounds (the 0x45d9f3b integer hash); int32 lanes keep it about as cheap as
    one more pass over memory.
    """
    h = index * 0x2C1B3C6D + seed
    h = (((h >> 16) & 0xFFFF) ^ h) * 0x45D9F3B
    h = (((h >> 16) & 0xFFFF) ^ h) * 0x45D9F3B
    return ((h >> 16) & 0xFFFF) ^ h


def keep_mask(like: Tensor, seed: Tensor, threshold: int) -> Tensor:
    """Bernoulli mask of ``like``'s shape, element i kept where hash(i, seed) < threshold."""
    if like.numel() > MAX_NUMEL:
        raise ValueError(f'the hashed drop mask indexes elements in int32; got {like.numel()} elements')
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int32).view(like.shape)
    return hash_i32(index, seed) < threshold


def _clip(x: Tensor, lo: Optional[float], hi: Optional[float]) -> Tensor:
    return x if lo is None else torch.clamp(x, lo, hi)


def _lsq_forward(x: Tensor, scale: Tensor, zero_point: Tensor, seed: Tensor, qmax: int,
                 threshold: Optional[int], lo: Optional[float], hi: Optional[float]) -> Tensor:
    r = _clip(x, lo, hi)
    y = (torch.clamp(torch.round(r / scale) + zero_point, 0, qmax) - zero_point) * scale
    if threshold is None:
        return y
    return torch.where(keep_mask(x, seed, threshold), y, r)


def _lsq_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, seed: Tensor, qmax: int,
                  threshold: Optional[int], lo: Optional[float], hi: Optional[float]) -> Tuple[Tensor, Tensor]:
    r = _clip(x, lo, hi)
    r_s = r / scale
    r_r = torch.round(r_s)
    level = r_r + zero_point
    inside = (level >= 0) & (level <= qmax)
    d_scale = torch.where(inside, r_r - r_s, torch.clamp(level, 0, qmax) - zero_point)
    if threshold is None:
        passes, grad_s = inside, (grad * d_scale).sum()
    else:
        keep = keep_mask(x, seed, threshold)
        passes, grad_s = inside | ~keep, torch.where(keep, grad * d_scale, 0.0).sum()
    if lo is not None:
        passes = passes & (x > lo)
        if hi is not None:
            passes = passes & (x < hi)
    return torch.where(passes, grad, 0.0), grad_s


def _mix(x_fp: Tensor, x_q: Tensor, seed: Tensor, threshold: int) -> Tensor:
    return torch.where(keep_mask(x_q, seed, threshold), x_q, x_fp)


def _mse_forward(pred: Tensor, target: Tensor, factor: float) -> Tensor:
    return (pred - target).pow(2).sum() * factor


def _mse_backward(grad: Tensor, pred: Tensor, target: Tensor, factor: float) -> Tensor:
    return (pred - target) * (grad * (2.0 * factor))


def _rectified_sigmoid(alpha: Tensor) -> Tuple[Tensor, Tensor]:
    """h(V) and dh/dV (zero where the clip is active, as autograd's clamp gives)."""
    sig = torch.sigmoid(alpha)
    raw = sig * (ZETA - GAMMA) + GAMMA
    d_h = torch.where((raw >= 0) & (raw <= 1), sig * (1 - sig) * (ZETA - GAMMA), 0.0)
    return torch.clamp(raw, 0, 1), d_h


def _soft_round_forward(w: Tensor, alpha: Tensor, scale: Tensor, zero_point: Tensor, qmax: int) -> Tensor:
    h, _ = _rectified_sigmoid(alpha)
    return (torch.clamp(torch.floor(w / scale) + h + zero_point, 0, qmax) - zero_point) * scale


def _soft_round_backward(grad: Tensor, w: Tensor, alpha: Tensor, scale: Tensor, zero_point: Tensor,
                         qmax: int) -> Tensor:
    h, d_h = _rectified_sigmoid(alpha)
    level = torch.floor(w / scale) + h + zero_point
    return torch.where((level >= 0) & (level <= qmax), grad * scale * d_h, 0.0)


def _round_loss_forward(alpha: Tensor, beta: Tensor) -> Tensor:
    h, _ = _rectified_sigmoid(alpha)
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def _round_loss_backward(grad: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    h, d_h = _rectified_sigmoid(alpha)
    u = 2 * h - 1
    d_u = torch.where(u == 0, 0.0, beta * u.abs().pow(beta - 1) * torch.sign(u))
    return -grad * 2 * d_u * d_h


ACT_MIN_NUMEL = 1 << 16
WEIGHT_MIN_NUMEL = 1 << 12
lsq_forward = Kernel(_lsq_forward, ACT_MIN_NUMEL)
lsq_backward = Kernel(_lsq_backward, ACT_MIN_NUMEL)
mix = Kernel(_mix, ACT_MIN_NUMEL)
mse_forward = Kernel(_mse_forward, ACT_MIN_NUMEL)
mse_backward = Kernel(_mse_backward, ACT_MIN_NUMEL)
soft_round_forward = Kernel(_soft_round_forward, WEIGHT_MIN_NUMEL)
soft_round_backward = Kernel(_soft_round_backward, WEIGHT_MIN_NUMEL)
round_loss_forward = Kernel(_round_loss_forward, WEIGHT_MIN_NUMEL)
round_loss_backward = Kernel(_round_loss_backward, WEIGHT_MIN_NUMEL)


class LSQDropFunction(torch.autograd.Function):
    """LSQ fake quantization with the QDrop drop in one forward and one backward pass.

    Forward: r = clamp(x, lo, hi) (an optional ReLU/ReLU6 folded in), y = where(keep,
    s·(clamp(round(r/s) + z, 0, Q) − z), r), keep = hash(i, seed) < t (``threshold`` None: no drop).
    Backward: straight-through for r inside the grid, identity where dropped, times the clip's
    gradient; LSQ gradient for s summed over kept elements, times ``grad_factor``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, seed: Tensor, qmax: int,
                threshold: Optional[int], lo: Optional[float], hi: Optional[float], grad_factor: float,
                compile: bool) -> Tensor:
        flat = x.reshape(-1)
        ctx.save_for_backward(flat, scale, zero_point, seed)
        ctx.args = (qmax, threshold, lo, hi)
        ctx.grad_factor, ctx.compile = grad_factor, compile
        return lsq_forward(flat, scale, zero_point, seed, qmax, threshold, lo, hi, compile=compile).view(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat, scale, zero_point, seed = ctx.saved_tensors
        grad_x, grad_s = lsq_backward(grad.reshape(-1), flat, scale, zero_point, seed, *ctx.args,
                                      compile=ctx.compile)
        grad_scale = (grad_s * ctx.grad_factor).reshape(scale.shape) if ctx.needs_input_grad[1] else None
        return grad_x.view(grad.shape), grad_scale, None, None, None, None, None, None, None, None


def lsq_drop(x: Tensor, scale: Tensor, zero_point: Tensor, qmax: int, keep_prob: float, grad_factor: float,
             compile: bool = True, clip: Optional[Tuple[float, Optional[float]]] = None) -> Tensor:
    """LSQ fake quantization of clamp(x, *clip), keeping quantization per element with probability ``keep_prob``."""
    threshold = keep_threshold(keep_prob) if keep_prob < 1.0 else None
    seed = draw_seed(x.device) if threshold is not None else x.new_zeros((), dtype=torch.int32)
    lo, hi = clip if clip is not None else (None, None)
    return LSQDropFunction.apply(x.contiguous(), scale, zero_point, seed, qmax, threshold, lo, hi, grad_factor,
                                 compile)


FOLDABLE_CLIPS = {torch.nn.ReLU: (0.0, None), torch.nn.ReLU6: (0.0, 6.0)}


def activation_clip(activation: Optional[torch.nn.Module]) -> Optional[Tuple[float, Optional[float]]]:
    """(lo, hi) of a ReLU or ReLU6 the LSQ kernel can fold in; None for anything else."""
    return FOLDABLE_CLIPS.get(type(activation))


def mix_inputs(x_fp: Tensor, x_q: Tensor, keep_prob: float, compile: bool = True) -> Tensor:
    """where(U < p, x_q, x_fp), U from the counter-based hash with a fresh seed (no gradient)."""
    if keep_prob >= 1.0:
        return x_q
    if keep_prob <= 0.0:
        return x_fp
    return mix(x_fp.reshape(-1), x_q.reshape(-1), draw_seed(x_q.device), keep_threshold(keep_prob),
               compile=compile).view(x_q.shape)


class OutputMSEFunction(torch.autograd.Function):
    """Squared error summed over dim 1, averaged over the rest: one pass forward, one backward."""

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, compile: bool) -> Tensor:
        pred_flat, target_flat = pred.reshape(-1), target.reshape(-1)
        ctx.save_for_backward(pred_flat, target_flat)
        ctx.factor, ctx.compile, ctx.shape = pred.shape[1] / pred.numel(), compile, pred.shape
        return mse_forward(pred_flat, target_flat, ctx.factor, compile=compile)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pred_flat, target_flat = ctx.saved_tensors
        grad_pred = mse_backward(grad, pred_flat, target_flat, ctx.factor, compile=ctx.compile)
        return grad_pred.view(ctx.shape), None, None


def output_mse(pred: Tensor, target: Tensor, compile: bool = True) -> Tensor:
    return OutputMSEFunction.apply(pred, target, compile)


class SoftRoundFunction(torch.autograd.Function):
    """AdaRound's soft-rounded weight s·(clamp(floor(w/s) + h(V) + z, 0, Q) − z); gradient for V only.

    Per output channel (dim 0): the kernels see w and V as channels x rest, s and z as channels x 1.
    """

    @staticmethod
    def forward(ctx, w: Tensor, alpha: Tensor, scale: Tensor, zero_point: Tensor, qmax: int, compile: bool) -> Tensor:
        channels = w.shape[0]
        w2, alpha2 = w.reshape(channels, -1), alpha.reshape(channels, -1)
        scale2, zero_point2 = scale.reshape(channels, 1), zero_point.reshape(channels, 1)
        ctx.save_for_backward(w2, alpha2, scale2, zero_point2)
        ctx.qmax, ctx.compile = qmax, compile
        return soft_round_forward(w2, alpha2, scale2, zero_point2, qmax, compile=compile).view(w.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w2, alpha2, scale2, zero_point2 = ctx.saved_tensors
        grad_alpha = soft_round_backward(grad.reshape(w2.shape), w2, alpha2, scale2, zero_point2, ctx.qmax,
                                         compile=ctx.compile)
        return None, grad_alpha.view(grad.shape), None, None, None, None


def soft_round(w: Tensor, alpha: Tensor, scale: Tensor, zero_point: Tensor, qmax: int,
               compile: bool = True) -> Tensor:
    """Soft-rounded w with per-output-channel (dim 0) scale and zero point."""
    return SoftRoundFunction.apply(w, alpha, scale, zero_point, qmax, compile)


class RoundLossFunction(torch.autograd.Function):
    """Σ (1 − |2h(V) − 1|^β) in one pass, its gradient for V in one pass."""

    @staticmethod
    def forward(ctx, alpha: Tensor, beta: Tensor, compile: bool) -> Tensor:
        flat = alpha.reshape(-1)
        ctx.save_for_backward(flat, beta)
        ctx.compile, ctx.shape = compile, alpha.shape
        return round_loss_forward(flat, beta, compile=compile)

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat, beta = ctx.saved_tensors
        return round_loss_backward(grad, flat, beta, compile=ctx.compile).view(ctx.shape), None, None


def round_loss(alpha: Tensor, beta: float, compile: bool = True) -> Tensor:
    return RoundLossFunction.apply(alpha, torch.tensor(beta, dtype=alpha.dtype, device=alpha.device), compile)
