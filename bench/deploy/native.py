"""A deployed codebook layer's inference in one native call (:file:`codebook_kernel.c`).

At batch 1 a PyTorch codebook layer is a chain of small operators (the features, the ``[in, K]`` table
of the K centroid functions, the offsets of the index, a gather and a sum), and their per-call cost,
not arithmetic, sets its latency: it was 1.5x its dense model's (``bench perf``). The kernel evaluates
the basis, the table and the index gather-sum for a whole sample in one C loop, reading the layer's
``uint8`` index as stored. Its cost grows with the batch (``in * out`` gathered adds a sample) while a
dense product's is mostly reading the weight once, so it runs up to :data:`MAX_ROWS` samples, where it
beats the PyTorch path (a gather of the edge vectors, then one dense product). Measured on
``kan [784, 64, 10]``, bspline, against the dense model: the kernel 0.37x at batch 1, 0.84x at 4, 1.36x
at 8, 2.1x at 16, where the PyTorch path is 2.0x; that path is 1.15x at 256. The kernel is
compiled on first use with the system C compiler (``$CC``, else ``cc``; about a second) into
``$BENCH_CACHE_DIR`` (default ``~/.cache/kan-bench``), keyed by the source, the flags and the CPU's
instruction-set flags, and loaded with :mod:`ctypes`. Where no compiler works, one line says so and the
layers run their PyTorch path (same values up to float rounding).

:func:`bench.deploy.compact` makes every codebook layer a :class:`NativeCodebookLayer`: the same module
(parameters, buffers, export, ONNX) whose forward takes this path when it can (a CPU model and input in
float32, ``[B, in]``, no gradient) and the PyTorch path otherwise. What the kernel reads is built on the
first call and rebuilt whenever a tensor of the layer is replaced or changed in place (a write through
``.data`` is not seen: as everywhere in PyTorch, it bypasses version counting); it is kept outside the
module, so copies and saved files never carry it.
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import platform
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

import torch

from bench.errors import warn_stderr
from bench.model.bases import BSplineBasis, ChebyshevBasis, FourierBasis, GramBasis, RBFBasis
from bench.model.kan import KANLayer

SOURCE = Path(__file__).with_name("codebook_kernel.c")
FLAGS = ["-O3", "-fopenmp-simd", "-std=c11", "-shared", "-fPIC"]
TUNE = ["-march=native"]  # dropped, with a second try, where the compiler rejects it
MAX_ROWS = 16  # larger batches take the PyTorch path: one gather of the edge vectors, then dense products
_LIB: dict = {"lib": None, "failed": None}
_LOCK = threading.Lock()
_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> _Cached


class _Cached(NamedTuple):
    """What the kernel reads for one layer (``data``), and the tensors and versions it was built from."""

    tensors: list  # every parameter and buffer, compared by identity on each forward
    versions: list  # the version counters of ``versioned``, compared on each forward
    versioned: list  # the tensors that have one (inference tensors have none): found once, not per call
    data: tuple | None  # (codebook^T, index, bias, basis kind, basis parameters), or None: cannot run


def cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "kan-bench")


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (``-march=native`` builds for them: a cache shared by machines
    with other CPUs must not hand one machine another's library)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(cc: str, flags: list[str]) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *flags, platform.machine(), _cpu_flags()]).encode())
    path = cache_dir() / f"codebook_kernel-{key.hexdigest()[:16]}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [""]
            first = next((line for line in lines if "error" in line), lines[0])
            raise OSError(f"{cc} failed: {first[:160]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)  # atomic: concurrent processes compile alike
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _compile() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    try:
        path = _build(cc, FLAGS + TUNE)
    except OSError:
        path = _build(cc, FLAGS)  # a compiler without -march=native: a portable build (or the same error)
    lib = ctypes.CDLL(str(path))
    fn = lib.kan_codebook_forward
    i, p = ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [i, i, i, i, i, p, p, i, p, p, p, i, p, p]
    fn.restype = i
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built here (said once, on stderr)."""
    if _LIB["lib"] is None and _LIB["failed"] is None:
        with _LOCK:
            if _LIB["lib"] is None and _LIB["failed"] is None:
                try:
                    _LIB["lib"] = _compile()
                except (OSError, subprocess.SubprocessError) as exc:
                    _LIB["failed"] = f"{type(exc).__name__}: {str(exc).strip()[:160]}"
                    warn_stderr(f"native codebook kernel unavailable ({_LIB['failed']}); deployed codebook "
                                "layers run their PyTorch path (same values, slower at small batches)")
    return _LIB["lib"]


def basis_kind(layer: KANLayer) -> tuple[int, torch.Tensor]:
    """The kernel's basis code and parameters for ``layer`` (0: the features are computed by torch)."""
    b = layer.basis

    def floats(*v) -> torch.Tensor:
        return torch.cat([torch.as_tensor(t, dtype=torch.float32).reshape(-1) for t in v]).contiguous()

    kind = type(b)  # exactly these classes: a subclass may change the formula
    if kind is BSplineBasis and b.closed_form:
        return 1, floats(b.lo, b.hi, b.grid_size, float(not b.extrapolate))
    if kind is RBFBasis:
        n = b.n_basis
        if b.use_norm:
            norm = b.norm
            return 2, floats(n, b.inv_width, 1.0, norm.eps, b.centers, norm.weight.detach(), norm.bias.detach())
        return 2, floats(n, b.inv_width, 0.0, 0.0, b.centers)
    if kind is ChebyshevBasis:
        return 3, floats(b.degree, b.margin)
    if kind is GramBasis:
        return 4, floats(b.degree, b.margin)
    if kind is FourierBasis:
        return 5, floats(b.frequencies)
    return 0, torch.zeros(1)


class NativeCodebookLayer(KANLayer):
    """A deployed codebook layer (:func:`bench.deploy.compact`): inference through the native kernel
    where it applies, else :class:`KANLayer`'s forward."""

    def _tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer of the layer and its submodules, read from their dictionaries (a
        third of ``parameters()`` and ``buffers()``'s cost: this check runs on every forward)."""
        out, mods = [], [self]
        for m in mods:  # grows while it is walked: every submodule once, in a fixed order
            if m is not None:
                out.extend(m._parameters.values())
                out.extend(m._buffers.values())
                mods.extend(m._modules.values())
        return [t for t in out if t is not None]

    def native_state(self) -> tuple | None:
        """What the kernel reads (the decoded codebook transposed ``[E, K]`` in float32, the index as
        stored, the bias, the basis parameters), or None where it cannot run this layer (not on the
        CPU, an index wider than 16 bits)."""
        tensors = self._tensors()
        state = _STATE.get(self)
        if (state is not None and len(state.tensors) == len(tensors) and all(map(operator.is_, state.tensors, tensors))
                and state.versions == [t._version for t in state.versioned]):
            return state.data
        src = self.source
        ok = all(t.device.type == "cpu" for t in tensors) and src.index.dtype in (torch.uint8, torch.int16)
        data = None
        if ok:
            with torch.no_grad():
                ct = src.codebook().float().t().contiguous()
                bias = None if self.bias is None else self.bias.detach().float().contiguous()
                kind, params = basis_kind(self)
            data = (ct, src.index.contiguous(), bias, kind, params)
        versioned = [t for t in tensors if not t.is_inference()]
        _STATE[self] = _Cached(tensors, [t._version for t in versioned], versioned, data)
        return data

    def native_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[B, in] -> [B, out]`` before the layer's norm and activation, or None where it does not apply."""
        if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.in_features
                or torch.is_grad_enabled() or x.shape[0] > MAX_ROWS):
            return None
        lib = library()
        state = None if lib is None else self.native_state()
        if state is None:
            return None
        ct, index, bias, kind, params = state
        x = x.contiguous()
        feats = self.features(x).contiguous() if kind == 0 else None
        rows, e = x.shape[0], self.edge_dim
        y = torch.empty(rows, self.out_features, dtype=torch.float32, device="cpu")
        status = lib.kan_codebook_forward(
            rows, self.in_features, self.out_features, e, ct.shape[1], x.data_ptr(),
            None if feats is None else feats.data_ptr(), kind, params.data_ptr(), ct.data_ptr(),
            index.data_ptr(), index.element_size(), None if bias is None else bias.data_ptr(), y.data_ptr())
        if status != 0:
            raise MemoryError("native codebook kernel: out of memory") if status == 2 else \
                RuntimeError(f"native codebook kernel: unknown basis kind {kind}")
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.native_forward(x)
        return super().forward(x) if y is None else self.finish(y)

    def path(self, rows: int) -> str:
        """Which path a CPU float32 inference of ``rows`` samples takes: ``"native kernel"``, or the
        PyTorch path's reason."""
        if rows > MAX_ROWS:
            return "PyTorch, blocked"
        if library() is None:
            return "PyTorch (no compiler)"
        return "native kernel" if self.native_state() is not None else "PyTorch"

    def held(self) -> list[torch.Tensor]:
        """The tensors the native path adds to what the layer holds (the transposed codebook, the basis
        parameters, a float32 copy of a narrower bias, a contiguous copy of an index stored as a
        view), built here if the kernel runs on this machine."""
        state = self.native_state() if library() is not None else None
        if state is None:
            return []
        ct, index, bias, _, params = state
        return [ct, params, index] + ([] if bias is None else [bias])  # a shared storage is counted once
