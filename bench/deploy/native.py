"""A deployed codebook layer's inference in one native call (:file:`codebook_kernel.c`).

At batch 1 a PyTorch codebook layer is a chain of small operators (the features, the ``[in, K]`` table
of the K centroid functions, the offsets of the index, a gather and a sum), and their per-call cost,
not arithmetic, sets its latency: it was 1.5x its dense model's (``bench perf``). The kernel evaluates
the basis, the table and the index gather-sum for a whole sample in one C loop, reading the layer's
``uint8`` index as stored. It is compiled on first use with the system C compiler (``$CC``, else
``cc``; about a second) into ``$BENCH_CACHE_DIR`` (default ``~/.cache/kan-bench``), keyed by the source
and the flags, and loaded with :mod:`ctypes`. Where no compiler works, one line says so and the layers
run their PyTorch path (same values up to float rounding).

:func:`bench.deploy.compact` makes every codebook layer a :class:`NativeCodebookLayer`: the same module
(parameters, buffers, export, ONNX) whose forward takes this path when it can (CPU, float32, no
gradient, at most :data:`MAX_BATCH` rows: above that PyTorch's multi-threaded matrix products win) and
the PyTorch path otherwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from bench.errors import warn_stderr
from bench.model.bases import BSplineBasis, ChebyshevBasis, FourierBasis, GramBasis, RBFBasis
from bench.model.kan import KANLayer

SOURCE = Path(__file__).with_name("codebook_kernel.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-std=c11", "-shared", "-fPIC"]
MAX_BATCH = 16  # rows per call; above it the layer's PyTorch path (threaded BLAS) is faster (bench perf)
_LIB: dict = {"lib": None, "failed": None}


def cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "kan-bench")


def _compile() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *FLAGS, platform.machine(), platform.processor()]).encode())
    path = cache_dir() / f"codebook_kernel-{key.hexdigest()[:16]}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or [""]
                first = next((line for line in lines if "error" in line), lines[0])
                raise OSError(f"{cc} failed: {first[:160]}")
            os.replace(tmp, path)  # atomic: concurrent processes compile alike
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    fn = lib.kan_codebook_forward
    i, p = ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [i, i, i, i, i, p, p, i, p, p, p, i, p, p]
    fn.restype = i
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built here (said once, on stderr)."""
    if _LIB["lib"] is None and _LIB["failed"] is None:
        try:
            _LIB["lib"] = _compile()
        except (OSError, subprocess.SubprocessError) as exc:
            _LIB["failed"] = f"{type(exc).__name__}: {str(exc).strip()[:160]}"
            warn_stderr(f"native codebook kernel unavailable ({_LIB['failed']}); deployed codebook layers "
                        "run their PyTorch path (same values, slower at small batches)")
    return _LIB["lib"]


def basis_kind(layer: KANLayer) -> tuple[int, torch.Tensor]:
    """The kernel's basis code and parameters for ``layer`` (0: the features are computed by torch)."""
    b = layer.basis

    def floats(*v) -> torch.Tensor:
        return torch.cat([torch.as_tensor(t, dtype=torch.float32).reshape(-1) for t in v]).contiguous()

    if isinstance(b, BSplineBasis) and b.closed_form:
        return 1, floats(b.lo, b.hi, b.grid_size, float(not b.extrapolate))
    if isinstance(b, RBFBasis):
        n = b.n_basis
        if b.use_norm:
            norm = b.norm
            return 2, floats(n, b.inv_width, 1.0, norm.eps, b.centers, norm.weight.detach(), norm.bias.detach())
        return 2, floats(n, b.inv_width, 0.0, 0.0, b.centers)
    if type(b) is ChebyshevBasis:
        return 3, floats(b.degree, b.margin)
    if type(b) is GramBasis:
        return 4, floats(b.degree, b.margin)
    if type(b) is FourierBasis:
        return 5, floats(b.frequencies)
    return 0, torch.zeros(1)


class NativeCodebookLayer(KANLayer):
    """A deployed codebook layer (:func:`bench.deploy.compact`): inference through the native kernel
    where it applies, else :class:`KANLayer`'s forward."""

    def native_state(self) -> tuple:
        """What the kernel reads, built on the first native call and again whenever a tensor changes:
        the decoded codebook transposed ``[E, K]`` (float32; the only tensor it adds), the index as
        stored, the bias and the basis parameters."""
        src = self.source
        stamp = tuple((t.data_ptr(), t._version) for t in (*src.buffers(), *src.parameters(), *self.parameters()))
        state = getattr(self, "_native", None)
        if state is None or state[0] != stamp:
            with torch.no_grad():
                ct = src.codebook().float().t().contiguous()
                bias = None if self.bias is None else self.bias.detach().float().contiguous()
                kind, params = basis_kind(self)
            index = src.index if src.index.dtype in (torch.uint8, torch.int16) else None
            state = self._native = (stamp, ct, index, bias, kind, params)
        return state

    def native_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[B, in] -> [B, out]`` before the layer's norm and activation, or None where it does not apply."""
        lib = library() if (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= MAX_BATCH
                            and not torch.is_grad_enabled()) else None
        if lib is None:
            return None
        _, ct, index, bias, kind, params = self.native_state()
        if index is None:
            return None
        x = x.contiguous()
        feats = None
        if kind == 0:
            feats = self.features(x).contiguous()
        y = torch.empty(x.shape[0], self.out_features)
        status = lib.kan_codebook_forward(
            x.shape[0], self.in_features, self.out_features, self.edge_dim, ct.shape[1], x.data_ptr(),
            None if feats is None else feats.data_ptr(), kind, params.data_ptr(), ct.data_ptr(), index.data_ptr(),
            index.element_size(), None if bias is None else bias.data_ptr(), y.data_ptr())
        if status != 0:
            raise MemoryError("native codebook kernel: out of memory") if status == 2 else \
                RuntimeError(f"native codebook kernel: unknown basis kind {kind}")
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.native_forward(x)
        return super().forward(x) if y is None else self.finish(y)

    def held(self) -> list[torch.Tensor]:
        """The tensors the native path adds to what the layer holds (the transposed codebook)."""
        state = getattr(self, "_native", None)
        return [] if state is None else [state[1], state[5]]
