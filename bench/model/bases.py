"""Basis functions for KAN edges, each registered by name.

A basis maps an input ``x`` of shape ``[B, in]`` to ``[B, in, n_basis]`` in one pass; the KAN
layer then appends ``silu(x)`` as the base branch, so every edge vector has ``n_basis + 1``
entries whatever the basis. Bases hold no trainable coefficients (those live in the layer's
coefficient source); some hold fixed buffers (the B-spline grid) or a small input norm (RBF).

Every default basis has 8 functions, so edge vectors are comparable (9 values) across bases.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UserError, warn_stderr
from bench.registry import Registry

BASES = Registry("basis")
register_basis = BASES.register


def make_basis(name: str, in_features: int, **kwargs) -> Basis:
    cls = BASES.lookup(name)
    try:
        return cls(in_features, **kwargs)
    except TypeError as exc:  # unexpected keyword
        raise UserError(f"bad option for basis {name!r}: {exc}") from None


class Basis(nn.Module):
    """``forward(x[B, in]) -> [B, in, n_basis]``.

    ``pointwise``: each input's basis values depend on that input alone, through parameters shared
    by every input (true unless a basis mixes inputs, as RBF's LayerNorm does). A KAN convolution
    then evaluates the basis once per pixel instead of once per patch element
    (:class:`bench.model.kan.KANConv2d`)."""

    name = "?"
    n_basis: int
    pointwise = True

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features

    def config(self) -> dict:
        """Constructor keyword arguments that rebuild this basis (used by export/load)."""
        return {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in] -> [B, in, n_basis + 1]``: the basis values, then ``silu(x)`` (the eager path; a
        basis may override it with a cheaper one, and :func:`fused_features` replaces it when compiled)."""
        return torch.cat([self(x), F.silu(x).unsqueeze(-1)], dim=-1)

    def kernel(self) -> tuple[Callable, tuple] | None:
        """``(fn, args)``: ``fn(x, *args) -> [B, n_basis + 1, in]`` is a KAN layer's features (this basis's
        values, then ``silu(x)``) laid out basis-major, as one pure function of ``x`` and constants
        (numbers, fixed buffers, the RBF's norm parameters), for the compiled features
        (:func:`fused_features`); None where the basis has none (it then always runs eagerly)."""
        return None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


KNOTS = ("uniform", "per_input")


@register_basis("bspline")
class BSplineBasis(Basis):
    """B-splines of order ``k`` on ``G`` intervals of ``[lo, hi]`` (pykan / efficient-kan).

    The grid is extended by ``k`` knots on each side, giving ``G + k`` basis functions.

    - ``extrapolate=False`` (default): inputs are clamped into ``[lo, hi)`` so they stay on the grid,
      where the splines form a partition of unity. ``extrapolate=True`` evaluates the same formula
      everywhere, as efficient-kan and pykan do: on the extension knots the splines no longer sum to
      1, and beyond them every spline is 0 (only the base branch remains).
    - ``knots="uniform"`` (default): one uniform knot vector derived from the config (not stored).
      ``knots="per_input"``: each input has its own knot row ``[in, G + 2k + 1]``, a stored buffer
      (``knots``): the non-uniform grids that pykan's ``fit()`` and efficient-kan's ``update_grid``
      leave. They are data: counted, exported, never fine-tuned, and kept at float32 by
      ``small_dtype``. Per-input knots are not pointwise (a KAN convolution unfolds its patches).

    Uniform cubics run a closed form (:class:`_UniformCubic`); everything else the Cox-de Boor
    recursion on the knots (:meth:`reference`; 0/0 from repeated knots is 0, as in pykan).
    """

    def __init__(self, in_features: int, grid: int = 5, order: int = 3, lo: float = -2.0, hi: float = 2.0,
                 extrapolate: bool = False, knots: str = "uniform"):
        super().__init__(in_features)
        _check(grid >= 1, f"bspline grid must be >= 1, got {grid}")
        _check(order >= 0, f"bspline order must be >= 0, got {order}")
        _check(hi > lo, f"bspline range needs lo < hi, got [{lo}, {hi}]")
        _check(extrapolate in (True, False), f"bspline extrapolate must be true or false, got {extrapolate!r}")
        _check(knots in KNOTS, f"bspline knots must be one of {', '.join(KNOTS)}; got {knots!r}")
        self.grid_size, self.order, self.lo, self.hi = grid, order, float(lo), float(hi)
        self.extrapolate, self.knot_mode = bool(extrapolate), knots
        h = (hi - lo) / grid
        uniform = lo + h * torch.arange(-order, grid + order + 1, dtype=torch.float32)
        if knots == "per_input":  # [in, G + 2k + 1], data (an import or a grid update writes it)
            self.register_buffer("knots", uniform.repeat(in_features, 1).contiguous())
            self.pointwise = False
        else:  # [G + 2k + 1], derived from the config
            self.register_buffer("knots", uniform, persistent=False)
        self.register_buffer("offsets", torch.arange(grid + 3, dtype=torch.float32) + 2.0, persistent=False)
        self.n_basis = grid + order

    def config(self) -> dict:
        cfg = {"grid": self.grid_size, "order": self.order, "lo": self.lo, "hi": self.hi}
        if self.extrapolate:  # only when set: existing configs (and the files that hold them) are unchanged
            cfg["extrapolate"] = True
        if self.knot_mode != "uniform":
            cfg["knots"] = self.knot_mode
        return cfg

    @property
    def closed_form(self) -> bool:
        return self.order == 3 and self.knot_mode == "uniform"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.closed_form:
            return _UniformCubic.apply(x, self.lo, self.hi, self.grid_size, not self.extrapolate)
        return self.reference(x)

    def kernel(self):
        if not self.closed_form:
            return None
        return _bspline_features, (self.lo, self.hi, self.grid_size, self.offsets, not self.extrapolate)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Cox-de Boor recursion on the knots, shared ``[G + 2k + 1]`` or per input ``[in, G + 2k + 1]``
        (any order; the cubic closed form is tested against it)."""
        t = self.knots.to(x.dtype)
        if not self.extrapolate and self.knot_mode == "uniform":
            x = x.clamp(self.lo, self.hi - 1e-6 * (self.hi - self.lo))
        elif not self.extrapolate:  # each input clamped into its own [t_k, t_{G+k})
            lo, hi = t[:, self.order], t[:, self.order + self.grid_size]
            x = torch.minimum(torch.maximum(x, lo), hi - 1e-6 * (hi - lo))
        return cox_de_boor(x, t, self.order)


def cox_de_boor(x: torch.Tensor, t: torch.Tensor, order: int) -> torch.Tensor:
    """B-splines of ``order`` on knots ``t`` (``[M]`` or one row per input, ``[in, M]``) at ``x[B, in]``:
    ``[B, in, M - order - 1]``, with half-open order-0 indicators and 0/0 (repeated knots) taken as 0."""
    x = x.unsqueeze(-1)  # [B, in, 1]
    b = ((x >= t[..., :-1]) & (x < t[..., 1:])).to(x.dtype)  # order 0: [B, in, M - 1]
    for p in range(1, order + 1):
        left = (x - t[..., : -(p + 1)]) / (t[..., p:-1] - t[..., : -(p + 1)])
        right = (t[..., p + 1:] - x) / (t[..., p + 1:] - t[..., 1:-p])
        b = torch.nan_to_num(left * b[..., :-1] + right * b[..., 1:])
    return b


class _UniformCubic(torch.autograd.Function):
    """Cubic B-splines on a uniform grid in closed form: basis ``j`` at ``x`` is the cardinal
    cubic of ``a = |u - j - 2|`` with ``u = (x - lo) / h + 3`` (knot units),
    ``N(a) = ((2 - a)_+^3 - 4 (1 - a)_+^3) / 6``.

    Written with in-place ops on two ``[B, in, G + 3]`` buffers (fresh large allocations cost
    page faults on every call); backward recomputes from ``x`` instead of keeping intermediates
    (only ``x``, ``[B, in]``, is saved). With ``clamp``, inputs are clamped to ``[lo, hi)``, so the
    gradient is zero outside it; without, the same formula holds everywhere (0 beyond the extended knots).
    """

    @staticmethod
    def _abs_distance(x, lo, hi, grid, clamp):
        h = (hi - lo) / grid
        u = ((x.clamp(lo, hi - 1e-6 * (hi - lo)) if clamp else x) - lo) * (1.0 / h) + 3.0
        j = torch.arange(grid + 3, dtype=x.dtype, device=x.device) + 2.0
        d = u.unsqueeze(-1) - j  # [B, in, G + 3]
        return d, h

    @staticmethod
    def forward(ctx, x, lo, hi, grid, clamp):
        d, _ = _UniformCubic._abs_distance(x, lo, hi, grid, clamp)
        a = d.abs_()
        out = torch.rsub(a, 2.0).clamp_(min=0.0).pow_(3)   # (2 - a)_+^3
        inner = a.neg_().add_(1.0).clamp_(min=0.0).pow_(3)  # (1 - a)_+^3, reusing a's buffer
        out.sub_(inner, alpha=4.0).mul_(1.0 / 6.0)
        ctx.save_for_backward(x)
        ctx.consts = (lo, hi, grid, clamp)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        lo, hi, grid, clamp = ctx.consts
        d, h = _UniformCubic._abs_distance(x, lo, hi, grid, clamp)
        sign = torch.sign(d)
        a = d.abs_()
        # dN/da = -(2 - a)_+^2 / 2 + 2 (1 - a)_+^2
        far = torch.rsub(a, 2.0).clamp_(min=0.0)
        near = a.neg_().add_(1.0).clamp_(min=0.0)
        dn = near.mul_(near).mul_(2.0).sub_(far.mul_(far), alpha=0.5)
        gx = (grad * dn.mul_(sign)).sum(-1) * (1.0 / h)
        if not clamp:
            return gx, None, None, None, None
        inside = (x >= lo) & (x < hi - 1e-6 * (hi - lo))
        return gx * inside, None, None, None, None


# The pure expressions the fused features compile. Constant vectors come in as tensors: built inside
# a compiled graph (arange, linspace) they are recomputed on every call and cost more than they save.
def _cubic_formula(x: torch.Tensor, lo: float, hi: float, grid: int, offsets: torch.Tensor,
                   clamp: bool = True, dim: int = -1) -> torch.Tensor:
    """:class:`_UniformCubic` as one differentiable expression; ``offsets`` is ``arange(grid + 3) + 2``.
    The basis index is dimension ``dim`` (-1: ``[B, in, n]``; 1: basis-major ``[B, n, in]``)."""
    h = (hi - lo) / grid
    u = ((x.clamp(lo, hi - 1e-6 * (hi - lo)) if clamp else x) - lo) * (1.0 / h) + 3.0
    a = (u.unsqueeze(dim) - _along(offsets.to(x.dtype), dim)).abs()
    return ((2.0 - a).clamp(min=0.0) ** 3 - 4.0 * (1.0 - a).clamp(min=0.0) ** 3) * (1.0 / 6.0)


def _along(v: torch.Tensor, dim: int) -> torch.Tensor:
    """A ``[n]`` vector shaped to broadcast along ``dim`` of ``x.unsqueeze(dim)`` for a 2-D ``x``."""
    return v if dim == -1 else v.view(-1, 1)


def _gaussian_formula(x: torch.Tensor, centers: torch.Tensor, inv_width: float, dim: int = -1) -> torch.Tensor:
    z = (x.unsqueeze(dim) - _along(centers.to(x.dtype), dim)) * inv_width
    return torch.exp(-z * z)


class _Gaussian(torch.autograd.Function):
    """``exp(-((x - c_k) w)^2)`` with in-place ops; backward recomputes from ``x`` (only
    ``[B, in]`` is saved instead of three ``[B, in, K]`` intermediates)."""

    @staticmethod
    def forward(ctx, x, centers, inv_width):
        z = (x.unsqueeze(-1) - centers).mul_(inv_width)
        out = z.square_().neg_().exp_()
        ctx.save_for_backward(x, centers)
        ctx.inv_width = inv_width
        return out

    @staticmethod
    def backward(ctx, grad):
        x, centers = ctx.saved_tensors
        w = ctx.inv_width
        z = (x.unsqueeze(-1) - centers).mul_(w)
        out = torch.square(z).neg_().exp_()
        gx = (grad * out).mul_(z).sum(-1).mul_(-2.0 * w)
        return gx, None, None


@register_basis("rbf")
class RBFBasis(Basis):
    """Gaussian radial basis on a LayerNorm'ed input (FastKAN): ``exp(-((x - c_k) / h)^2)``.

    ``norm="auto"`` (default) applies LayerNorm when the layer has at least 4 inputs: over 2 or 3
    features a per-sample LayerNorm throws away almost all of the input (two features normalise
    to +-1), which wrecks low-dimensional equation tasks. ``norm=True/False`` forces it.
    """

    def __init__(self, in_features: int, centers: int = 8, lo: float = -2.0, hi: float = 2.0,
                 norm: bool | str = "auto"):
        super().__init__(in_features)
        _check(centers >= 2, f"rbf needs >= 2 centers, got {centers}")
        _check(hi > lo, f"rbf range needs lo < hi, got [{lo}, {hi}]")
        _check(norm in (True, False, "auto"), f"rbf norm must be true, false or 'auto', got {norm!r}")
        if norm == "auto":
            norm = in_features >= 4
        self.lo, self.hi, self.use_norm = float(lo), float(hi), bool(norm)
        self.register_buffer("centers", torch.linspace(lo, hi, centers), persistent=False)  # from the config
        self.inv_width = (centers - 1) / (hi - lo)
        self.norm = nn.LayerNorm(in_features) if norm else nn.Identity()
        self.n_basis = centers
        self.pointwise = not self.use_norm  # LayerNorm mixes a row's inputs

    def config(self) -> dict:
        return {"centers": self.n_basis, "lo": self.lo, "hi": self.hi, "norm": self.use_norm}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Gaussian.apply(self.norm(x), self.centers, self.inv_width)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return _gaussian_formula(self.norm(x), self.centers, self.inv_width)

    def kernel(self):
        if self.use_norm:
            n = self.norm
            return _rbf_norm_features, (n.weight, n.bias, n.eps, self.centers, self.inv_width)
        return _rbf_features, (self.centers, self.inv_width)


def _squash(x: torch.Tensor, margin: float) -> torch.Tensor:
    """tanh into (-1, 1), clamped with a margin so polynomials and their gradients stay finite."""
    return torch.tanh(x).clamp(-1.0 + margin, 1.0 - margin)


def _chebyshev_formula(x: torch.Tensor, degree: int, margin: float, *last: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``T_0..T_degree`` of the squashed ``x`` stacked on the last dim, then the ``last`` columns (the
    features' ``silu(x)``: one stack writes the whole feature tensor, no second concatenation)."""
    x = _squash(x, margin)
    polys = [torch.ones_like(x), x]
    for _ in range(2, degree + 1):
        polys.append(2 * x * polys[-1] - polys[-2])
    return torch.stack([*polys, *last], dim=dim)


def _gram_formula(x: torch.Tensor, degree: int, margin: float, *last: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Gram polynomials of the squashed ``x``, then the ``last`` columns (as :func:`_chebyshev_formula`)."""
    x = _squash(x, margin)
    m = degree + 1
    polys = [torch.ones_like(x), x]
    for n in range(1, degree):
        polys.append(x * polys[-1] - (n * n * (m * m - n * n) / (m * m * (4 * n * n - 1))) * polys[-2])
    return torch.stack([*polys, *last], dim=dim)


def _fourier_formula(x: torch.Tensor, frequencies: int, *last: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``cos(k a)`` for ``k = 1..frequencies``, then ``sin(k a)``, with ``a = pi tanh(x)``, stacked on ``dim``,
    then the ``last`` columns (as :func:`_chebyshev_formula`). One cosine and one sine, then angle addition:
    as exact as a cosine and a sine per frequency (float32 against float64, inputs up to +-1e3 and near 0:
    1.2e-6 against 1.4e-6), and the compiled features take 0.57 instead of 1.28 ms at ``[256, 784]``."""
    a = math.pi * torch.tanh(x)
    c1, s1 = torch.cos(a), torch.sin(a)
    cos, sin = [c1], [s1]
    for _ in range(1, frequencies):
        c, s = cos[-1], sin[-1]
        cos.append(c * c1 - s * s1)
        sin.append(s * c1 + c * s1)
    return torch.stack([*cos, *sin, *last], dim=dim)


@register_basis("chebyshev")
class ChebyshevBasis(Basis):
    """Chebyshev polynomials ``T_0..T_degree`` of ``tanh(x)`` (ChebyKAN), by the three-term
    recurrence rather than ``cos(k acos x)``, and clamped with a margin: no NaN at +-1."""

    def __init__(self, in_features: int, degree: int = 7, margin: float = 1e-4):
        super().__init__(in_features)
        _check(degree >= 1, f"chebyshev degree must be >= 1, got {degree}")
        self.degree, self.margin = degree, margin
        self.n_basis = degree + 1

    def config(self) -> dict:
        return {"degree": self.degree, "margin": self.margin}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chebyshev_formula(x, self.degree, self.margin)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _chebyshev_formula(x, self.degree, self.margin, F.silu(x))

    def kernel(self):
        return _chebyshev_features, (self.degree, self.margin)


@register_basis("gram")
class GramBasis(Basis):
    """Gram polynomials of ``tanh(x)`` (KAGN style).

    Monic discrete-orthogonal (Gram) polynomials for ``m = degree + 1`` points rescaled to
    [-1, 1]: ``p_{n+1} = x p_n - beta_n p_{n-1}`` with
    ``beta_n = n^2 (m^2 - n^2) / (m^2 (4 n^2 - 1))`` (Legendre as m grows).
    """

    def __init__(self, in_features: int, degree: int = 7, margin: float = 1e-4):
        super().__init__(in_features)
        _check(degree >= 1, f"gram degree must be >= 1, got {degree}")
        self.degree, self.margin = degree, margin
        self.n_basis = degree + 1

    def config(self) -> dict:
        return {"degree": self.degree, "margin": self.margin}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gram_formula(x, self.degree, self.margin)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _gram_formula(x, self.degree, self.margin, F.silu(x))

    def kernel(self):
        return _gram_features, (self.degree, self.margin)


@register_basis("kagn")
class KAGNBasis(Basis):
    """torch-conv-kan's KAGN basis: ``silu(P_d(tanh x))`` for ``d = 0..degree``, with ``P_0 = 1``,
    ``P_1 = t`` and ``P_{n+1} = t P_n - beta_n P_{n-1}``, where the recurrence coefficients are
    **learned**: ``beta_n = w_n n^2 (2n + 1)(4n^2 - 1) / (n + 1)^2`` with ``w = beta`` (a parameter of
    ``degree + 1`` values per layer, trained, stored and counted; ``w_0`` and ``w_degree`` are unused
    and kept, as the library keeps them). No margin on ``tanh``. Initialised as the library does
    (``w ~ N(0, 1 / (in (degree + 1)))``), so at first ``P_n`` is about ``t^n``. Default degree 7 (8
    functions, as every default basis here; the library's default is 3).
    """

    def __init__(self, in_features: int, degree: int = 7):
        super().__init__(in_features)
        _check(degree >= 0, f"kagn degree must be >= 0, got {degree}")
        self.degree = degree
        self.beta = nn.Parameter(torch.empty(degree + 1))
        nn.init.normal_(self.beta, 0.0, 1.0 / (in_features * (degree + 1.0)))
        self.n_basis = degree + 1

    def config(self) -> dict:
        return {"degree": self.degree}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(x)
        polys = [torch.ones_like(t), t][: self.degree + 1]
        for n in range(1, self.degree):
            polys.append(t * polys[-1] - (self.beta[n] * (n * n * (2 * n + 1) * (4 * n * n - 1) / (n + 1) ** 2))
                         * polys[-2])
        return F.silu(torch.stack(polys, dim=-1))


@register_basis("fourier")
class FourierBasis(Basis):
    """``cos(k x), sin(k x)`` for ``k = 1..frequencies`` on ``pi * tanh(x)`` (FourierKAN-like)."""

    def __init__(self, in_features: int, frequencies: int = 4):
        super().__init__(in_features)
        _check(frequencies >= 1, f"fourier frequencies must be >= 1, got {frequencies}")
        self.frequencies = frequencies
        # the frequencies 1..F as constants of the ONNX export (bench.deploy.onnx_export), which writes
        # cos(k a) and sin(k a) directly; torch's features use angle addition (_fourier_formula)
        self.register_buffer("k", torch.arange(1, frequencies + 1, dtype=torch.float32), persistent=False)
        self.n_basis = 2 * frequencies

    def config(self) -> dict:
        return {"frequencies": self.frequencies}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fourier_formula(x, self.frequencies)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _fourier_formula(x, self.frequencies, F.silu(x))

    def kernel(self):
        return _fourier_features, (self.frequencies,)


# -- fused features (the default) ----------------------------------------------------------------
# A KAN layer's features, the basis values and silu(x), are a chain of elementwise passes over an
# [B, in, n_basis + 1] tensor; on a CPU they, not the matrix product, dominate a KAN's step. torch.compile
# (inductor) fuses each basis's expression, forward and backward, into one loop: measured with
# `python -m bench perf`, 2-4x cheaper features than the eager passes. Compiled once per basis kind with
# dynamic shapes (every layer and batch size reuses it); the first call in a process pays the
# compilation (about 20 s on 2 cores the first time on a machine, about 1 s once inductor's disk
# cache has it). Where compiling fails (no C compiler, a device inductor does not support) the first
# failure is said in one line and every layer runs eagerly from then on: same values, slower.
_FUSED: dict = {"mode": None, "compiled": {}, "failed": None}
FUSED_DEVICES = ("cpu", "cuda")
# Inductor decides once, from the sizes of the first call, whether a CPU loop runs on every thread, and
# its on-disk cache hands that decision to every later process on the machine: features first compiled
# for a tiny layer (an equation task, a test) stayed single-threaded for every layer of every model after,
# up to 2x slower (measured: chebyshev features at [256, 784], 0.70-0.87 ms against 0.49-0.56 ms).
# ``dynamic_threads`` makes every loop a parallel one, sized by the thread count at run time (the same
# values; ~15 us more on a tiny input), and is part of the cache key, so no serial kernel is reused.
COMPILE_OPTIONS = {"cpp.dynamic_threads": True}


# One function per basis kind (torch.compile caches per code object): basis values, then silu(x), laid
# out basis-major, [B, n_basis + 1, in]: the compiled loop then runs along the inputs (vectorised) and
# is about twice as fast as writing [B, in, n_basis + 1] (measured: bspline 0.38 vs 0.72 ms forward at
# [256, 784]). fused_features hands it on as a [B, in, n_basis + 1] view (see basis_major).
def _silu_row(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x).unsqueeze(1)


def _bspline_features(x, lo, hi, grid, offsets, clamp):
    return torch.cat([_cubic_formula(x, lo, hi, grid, offsets, clamp, dim=1), _silu_row(x)], dim=1)


def _rbf_features(x, centers, inv_width):
    return torch.cat([_gaussian_formula(x, centers, inv_width, dim=1), _silu_row(x)], dim=1)


def _rbf_norm_features(x, weight, bias, eps, centers, inv_width):
    """FastKAN's layer: Gaussians of the LayerNorm'ed input, silu of the raw input. Compiled as one
    expression, the norm, the Gaussians and both their backwards are one loop each way."""
    xn = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return torch.cat([_gaussian_formula(xn, centers, inv_width, dim=1), _silu_row(x)], dim=1)


def _chebyshev_features(x, degree, margin):
    return _chebyshev_formula(x, degree, margin, F.silu(x), dim=1)


def _gram_features(x, degree, margin):
    return _gram_formula(x, degree, margin, F.silu(x), dim=1)


def _fourier_features(x, frequencies):
    return _fourier_formula(x, frequencies, F.silu(x), dim=1)


def basis_major(features: torch.Tensor) -> bool:
    """Whether ``features [B, in, E]`` is a view of a contiguous basis-major ``[B, E, in]`` tensor (what
    the compiled features give): a matmul then reads it as ``[B, E * in]`` against the edge tensor
    permuted to ``[out, E, in]`` (:meth:`bench.model.sources.EdgeSource.contract`), with no copy."""
    if features.dim() != 3 or features.shape[1] < 2:
        return False
    _, n, e = features.shape
    return features.stride() == (n * e, 1, n)


def use_fused_features(on: bool | None) -> bool | None:
    """Compiled basis features for every KAN layer in this process: ``True``/``None`` (the default:
    wherever a compiler works) or ``False`` (always eager); returns the mode it replaces.
    ``BENCH_EAGER=1`` in the environment makes the default eager."""
    old, _FUSED["mode"] = _FUSED["mode"], None if on is None else bool(on)
    return old


@contextlib.contextmanager
def eager_features():
    """Within the block every layer runs its eager features (FLOP counting, quick timing probes)."""
    old = _FUSED["mode"]
    _FUSED["mode"] = False
    try:
        yield
    finally:
        _FUSED["mode"] = old


def fused_on() -> bool:
    """Whether layers try the compiled features now (the mode, else ``BENCH_EAGER``)."""
    mode = _FUSED["mode"]
    if mode is None:
        mode = os.environ.get("BENCH_EAGER", "") in ("", "0")
    return bool(mode) and _FUSED["failed"] is None


def features_path() -> str:
    """``"compiled"`` or ``"eager"``, what a layer's features run now (for a results row)."""
    return "compiled" if fused_on() else "eager"


def fused_features(basis: Basis, x: torch.Tensor) -> torch.Tensor | None:
    """``[B, in] -> [B, in, n_basis + 1]`` through the compiled expression of ``basis``, or None where
    the eager path runs instead (compiled features off or failed, a basis without a kernel, a batch
    of one row, a device inductor does not compile for)."""
    if x.shape[0] < 2:
        return None  # rows 0 and 1 are specialised by the compiler: one more graph each, not worth it
    kernel = basis.kernel()
    if kernel is None:
        return None
    fn, args = kernel
    # rows and inputs vary from layer to layer and batch to batch: dynamic from the first call, so one
    # graph serves them all (otherwise each new size compiles once more, up to dynamo's recompile limit)
    out = run_compiled(fn, x, *args, dynamic=((x, (0, 1)),))
    return None if out is None else out.transpose(1, 2)  # [B, in, n_basis + 1], basis-major underneath


def run_compiled(fn, *args, dynamic=()):
    """``fn(*args)`` compiled by inductor (once per function, with :data:`COMPILE_OPTIONS`), or None where
    the caller runs its eager path instead: compiled features off (:func:`fused_on`) or failed, or the
    first argument on a device inductor does not compile for. ``dynamic`` lists ``(tensor, dims)`` whose
    sizes vary between calls (marked dynamic, so one graph serves them all). The first failure (no C
    compiler, say) is said in one line and turns every compiled path of the process off."""
    if not fused_on() or args[0].device.type not in FUSED_DEVICES:
        return None
    try:
        compiled = _FUSED["compiled"].get(fn)
        if compiled is None:
            import logging  # inductor's CPU build looks for CUDA headers and warns on every CPU-only machine

            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            # one graph per grad mode x which inputs need gradients x dtype: the RBF kernel (its norm's
            # parameters are inputs) reaches dynamo's default of 8 in a sweep, which then runs it eagerly
            config = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if getattr(config, name, 64) < 64:
                    setattr(config, name, 64)
            compiled = _FUSED["compiled"][fn] = torch.compile(fn, options=COMPILE_OPTIONS)
        for t, dims in dynamic:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(t, dim)
        return compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: say it once, run eagerly from now on
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        _FUSED["failed"] = f"{type(exc).__name__}: {first}"
        warn_stderr(f"note: compiled KAN kernels unavailable ({_FUSED['failed']}, compiling "
                    f"{getattr(fn, '__name__', fn)}); every layer runs eagerly (same values, slower)")
        return None
