"""Post-training quantisation algorithms that choose integer codes on a fixed grid.

A KAN layer is a linear map from its features ``X [B, in*(n+1)]`` (basis values, then silu) to
``[B, out]`` through ``W [out, in*(n+1)]``, the flattened edge tensor. Given a grid (per value:
scale ``s``, zero point ``z``, code range ``[qmin, qmax]``; :class:`bench.compression.quant.LayerGrid`), the
layer objective of codes ``q`` is ``||X (W - (q - z) s)^T||^2``, i.e. ``tr(dW H dW^T)`` with
``H = X^T X / B``. Round to nearest ignores ``H``; these two use it:

- :func:`gptq_codes` (Frantar et al., "GPTQ", ICLR 2023): quantise one column at a time and
  spread its error over the columns not yet quantised through the inverse Hessian (the
  Optimal Brain Quantizer update), in blocks, with the upper Cholesky factor of ``H^-1``;
  columns in decreasing ``diag(H)`` order ("act order"), 1 % dampening.
- :func:`adaround_codes` (Nagel et al., "Up or Down? Adaptive Rounding", ICML 2020): learn,
  per value, whether to round down or up, through a rectified sigmoid ``h(V)`` and the
  regulariser ``1 - |2h - 1|^beta`` (beta annealed 20 -> 2 after a 20 % warm-up) that drives
  every ``h`` to 0 or 1, on mini-batches of ``X``; never worse than round to nearest on ``X``.

Both return int64 codes of ``W``'s shape; :func:`layer_objective` scores any dequantised weights.
"""

from __future__ import annotations

import torch


def layer_hessian(x: torch.Tensor) -> torch.Tensor:
    """``H = X^T X / B`` of the features ``x [B, D]`` (float32)."""
    x = x.float()
    return x.t() @ x / x.shape[0]


@torch.no_grad()
def layer_objective(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """The layer objective ``||X (W - Wq)^T||^2 = B tr(dW H dW^T)`` relative to the layer's output
    energy ``||X W^T||^2`` (``x [B, D]``, ``w, wq [out, D]``): 0 is exact, 1 as bad as zero weights."""
    x = x.double()
    return float(((x @ (w - wq).double().t()) ** 2).sum() / ((x @ w.double().t()) ** 2).sum().clamp(min=1e-300))


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper-triangular ``U`` with ``U^T U = H^-1``, from one Cholesky factorisation: with ``P`` the
    order reversal and ``P H P = L L^T``, ``U = P L^-1 P``."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lower = torch.linalg.cholesky(h.flip(0, 1))
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


@torch.no_grad()
def gptq_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               qmin: torch.Tensor, qmax: torch.Tensor, block: int = 128, damp: float = 0.01,
               act_order: bool = True) -> torch.Tensor:
    """GPTQ codes of ``w [out, D]`` on the grid ``scale, zero, qmin, qmax`` (each ``[out, D]``)
    for the layer Hessian ``h [D, D]``."""
    out, dim = w.shape
    w, h = w.detach().clone().float(), h.detach().clone().float()
    scale, zero, qmin, qmax = (t.float() for t in (scale, zero, qmin, qmax))
    dead = torch.diag(h) == 0  # a feature never active: its weights do not matter, store zero
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(dim, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    scale, zero, qmin, qmax = (t[:, perm] for t in (scale, zero, qmin, qmax))
    h += torch.eye(dim, device=h.device) * damp * torch.diag(h).mean()
    u = _inverse_cholesky_upper(h)
    codes = torch.zeros(out, dim, dtype=torch.int64, device=w.device)
    for i1 in range(0, dim, block):
        i2 = min(i1 + block, dim)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            j = i1 + i
            col = w1[:, i]
            q = (torch.round(col / scale[:, j]) + zero[:, j]).clamp(qmin[:, j], qmax[:, j])
            codes[:, j] = q.to(torch.int64)
            err = (col - (q - zero[:, j]) * scale[:, j]) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    result = torch.empty_like(codes)
    result[:, perm] = codes
    return result


def adaround_codes(w: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   qmin: torch.Tensor, qmax: torch.Tensor, iters: int = 500, batch: int = 256,
                   lr: float = 0.1, reg: float = 1.0, warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0),
                   seed: int = 0) -> torch.Tensor:
    """AdaRound codes of ``w [out, D]`` on the grid (each ``[out, D]``), learned on the features
    ``x [B, D]``: ``iters`` Adam steps on mini-batches of ``batch`` rows, minimising the layer's
    output MSE relative to round to nearest's plus ``reg`` times the mean rounding regulariser.
    With the few steps a CPU sweep affords, the learned rounding can end worse than round to nearest
    on a small layer; the codes returned are the better of the two on the whole of ``x``."""
    gamma, zeta = -0.1, 1.1
    w, x = w.detach().float(), x.detach().float()
    scale, zero, qmin, qmax = (t.detach().float() for t in (scale, zero, qmin, qmax))
    floor = torch.floor(w / scale)
    rest = (w / scale - floor).clamp(1e-4, 1 - 1e-4)
    v = torch.log((rest - gamma) / (zeta - rest)).requires_grad_(True)  # h(v) = rest at the start

    def soft(v):
        return (torch.sigmoid(v) * (zeta - gamma) + gamma).clamp(0, 1)

    def dequant(h):
        return ((floor + h + zero).clamp(qmin, qmax) - zero) * scale

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the objective's scale: round to nearest's error on the whole batch
        rtn = ((torch.round(w / scale) + zero).clamp(qmin, qmax) - zero) * scale
        norm = float(((x @ (w - rtn).t()) ** 2).mean().clamp(min=1e-20))
    opt = torch.optim.Adam([v], lr=lr)
    start = int(warmup * iters)
    for it in range(iters):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=g).to(x.device)
        h = soft(v)
        loss = ((x[idx] @ (w - dequant(h)).t()) ** 2).mean() / norm
        if it >= start:
            b = beta[1] + (beta[0] - beta[1]) * (1 - (it - start) / max(1, iters - start))
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(b)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        codes = (floor + (soft(v) >= 0.5).float() + zero).clamp(qmin, qmax)
        if float(((x @ (w - (codes - zero) * scale).t()) ** 2).mean()) > norm:
            codes = (torch.round(w / scale) + zero).clamp(qmin, qmax)
        return codes.to(torch.int64)
