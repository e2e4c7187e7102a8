"""ONNX export that keeps each layer's compressed form.

A KAN layer becomes ONNX operators in three parts: its **features** (the basis values and ``silu(x)``,
written with elementwise ONNX operators for every built-in basis), its **edge tensor** rebuilt at run time
from what the source stores, and one ``Gemm``. The stored tensors are the initializers, at the narrowest
ONNX type that holds them:

- dense edges: the float32 edge tensor;
- scalar-quantised (``quantize``, QAT frozen): integer codes (``INT4``/``UINT4`` for up to 4 bits, else 8
  or 16) and their scales, ``DequantizeLinear`` per tensor, per output node (per axis) or per edge
  (blocked);
- codebook (``kmeans``, ``metacluster``, shared and pruned codebooks): the centroids (float32, float16 or
  integer codes + scales) and the indices (``UINT4``/``UINT8``/``UINT16``), ``Cast`` + ``Gather``;
- pruned: the surviving edge vectors and the pattern (the 1-bit mask packed 8 per byte and unpacked with
  ``BitShift``/``BitwiseAnd``/``NonZero``, or the positions), ``ScatterND`` into zeros;
- Tucker: the core and the three factors, one ``Einsum``; MetaKAN: the per-edge embeddings and the
  meta-learner, two ``Gemm``; mixed precision: each branch as above, ``Concat``;
- entropy-coded streams cannot be decoded by ONNX operators: they are written at their plain width.

A source without an ONNX form here is written as its dense float32 edge tensor (``form = "dense"``,
said in :class:`OnnxExport`). Biases, LayerNorms and per-input knots are float initializers at their
stored dtype (``small_dtype``: float16, cast at run time). Widths that ONNX has no type for (1-3, 5-7, 9-15
bits) are bit-packed into bytes exactly as in the ``.kanb`` file and unpacked by the graph
(``BitShift``/``BitwiseAnd``/``ReduceSum``, constant-folded when a session loads).

Checked with onnxruntime against the PyTorch model for every method, basis and model kind in
``tests/test_onnx_export.py``. Public entry points: :func:`export_onnx` and :func:`check_onnx`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.compression.storage import storage_report
from bench.errors import UserError
from bench.model.kan import KAN, ConvKAN, KANConv2d, KANLayer

OPSET = 21  # INT4/UINT4, blocked DequantizeLinear


class ExportRefused(UserError):
    """A model (or a part of it) this exporter has no exact ONNX form for; one line says which."""


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: ``path``, its ``bytes``, the counted bytes of the model, each
    layer's form (``compressed`` or ``dense`` with the source type) and notes (entropy-coded streams
    written at their plain width)."""

    path: Path
    bytes: int
    counted_bytes: float
    forms: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- graph building
class Graph:
    """A small ONNX graph builder: initializers from arrays, nodes with fresh output names."""

    def __init__(self) -> None:
        from onnx import TensorProto, helper

        self.helper, self.T = helper, TensorProto
        self.nodes, self.inits, self._n = [], [], 0
        self._consts: dict = {}
        self.small_dtype: str | None = None  # the model's small_dtype (biases and norms at 16 bits)

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        """A (deduplicated) constant initializer from a number or array."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(arr, hint)
        return self._consts[key]

    def init(self, arr: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def packed(self, values: np.ndarray, onnx_type: int, hint: str) -> str:
        """4-bit integers (``INT4``/``UINT4``), two per byte, low nibble first (ONNX's layout)."""
        v = (np.asarray(values).astype(np.int64).reshape(-1) & 0xF).astype(np.uint8)
        if v.size % 2:
            v = np.append(v, np.uint8(0))
        raw = (v[0::2] | (v[1::2] << 4)).astype(np.uint8).tobytes()
        name = self.name(hint)
        self.inits.append(self.helper.make_tensor(name, onnx_type, list(np.asarray(values).shape), raw, raw=True))
        return name

    def floats(self, t: torch.Tensor, hint: str) -> str:
        """A float tensor at its own dtype (float16/bfloat16 cast to float32 in the graph)."""
        if t.dtype == torch.float32:
            return self.init(_np(t), hint)
        if t.dtype == torch.float16:
            return self.op("Cast", self.init(_np(t), hint), to=self.T.FLOAT)
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the raw 16-bit words
            raw = t.detach().cpu().contiguous().view(torch.int16).numpy().tobytes()
            name = self.name(hint)
            self.inits.append(self.helper.make_tensor(name, self.T.BFLOAT16, list(t.shape), raw, raw=True))
            return self.op("Cast", name, to=self.T.FLOAT)
        return self.init(_f32(t), hint)

    def param(self, t: torch.Tensor, hint: str) -> str:
        """A tensor outside the edge sources (bias, norm): at 16 bits when the model is stored so
        (``small_dtype``: its values are already rounded to that width, so the cast back is exact)."""
        small = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.small_dtype or "")
        if small is not None and t.dtype == torch.float32:
            return self.floats(t.detach().to(small), hint)
        return self.floats(t, hint)

    def ints(self, t: torch.Tensor, bits: int, signed: bool, hint: str) -> str:
        """Integer codes of ``bits`` bits at exactly that width: INT4/UINT4, (U)INT8, (U)INT16 where ONNX
        has the type; any other width bit-packed into UINT8 bytes (as the ``.kanb`` file packs them) and
        unpacked in the graph to INT32 (constant-folded when the session loads: no run-time cost)."""
        v = _np(t).astype(np.int64)
        T = self.T
        if bits == 4:
            return self.packed(v, T.INT4 if signed else T.UINT4, hint)
        if bits in (8, 16):
            types = {8: (np.int8, np.uint8), 16: (np.int16, np.uint16)}[bits]
            return self.init(v.astype(types[0] if signed else types[1]), hint)
        return self.unpacked(v, bits, signed, hint)

    def unpacked(self, v: np.ndarray, bits: int, signed: bool, hint: str) -> str:
        """``v`` stored ``bits`` bits per value (signed values offset by ``2^(bits-1)``), as INT32 in the graph."""
        from bench.compression.storage import pack_bits

        shape, offset = list(v.shape), (1 << (bits - 1)) if signed else 0
        flat = v.reshape(-1) + offset
        packed = np.frombuffer(pack_bits(flat, bits), dtype=np.uint8)
        planes = _bit_planes(self, self.init(packed, f"{hint}_bits"), flat.size * bits)  # UINT8 [n * bits] of 0/1
        words = self.op("Reshape", self.op("Cast", planes, to=self.T.INT32), self.const([flat.size, bits], np.int64))
        value = self.op("ReduceSum", self.op("Mul", words, self.const(1 << np.arange(bits), np.int32)),
                        self.const([1], np.int64), keepdims=0)
        if offset:
            value = self.op("Sub", value, self.const(offset, np.int32))
        return self.op("Reshape", value, self.const(shape, np.int64))

    def index(self, t: torch.Tensor, bits: int, hint: str) -> str:
        """Unsigned indices, cast to INT64 at run time (Gather and ScatterND take no narrower type)."""
        return self.op("Cast", self.ints(t, bits, False, hint), to=self.T.INT64)

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def model(self, inputs, outputs, doc: str):
        graph = self.helper.make_graph(self.nodes, "kan", inputs, outputs, self.inits)
        # stamped with the oldest IR version its opset needs, not the installed onnx's newest: onnx 1.23 writes
        # IR 14 by default, which onnxruntime 1.30 refuses to load (found on a GPU machine with those two)
        opsets = [self.helper.make_opsetid("", OPSET)]
        return self.helper.make_model(graph, opset_imports=opsets, ir_version=self.helper.find_min_ir_version_for(
            opsets), producer_name="kan-compression-bench", doc_string=doc)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def _bit_planes(g: Graph, packed: str, n: int) -> str:
    """The first ``n`` bits of UINT8 bytes ``packed`` (little-endian bit order), one UINT8 0/1 each."""
    b = g.op("Unsqueeze", packed, g.const([1], np.int64))                                    # [nb, 1]
    planes = g.op("BitwiseAnd", g.op("BitShift", b, g.const(np.arange(8), np.uint8), direction="RIGHT"),
                  g.const(1, np.uint8))                                                      # [nb, 8]
    return g.op("Slice", g.op("Reshape", planes, g.const([-1], np.int64)), g.const([0], np.int64),
                g.const([n], np.int64))


def _bits(encoding: str) -> tuple[int, bool]:
    """``uint4`` -> (4, False), ``int3`` -> (3, True)."""
    signed = encoding.startswith("int")
    return int(encoding[3 if signed else 4:]), signed


# ----------------------------------------------------------------------------- edge tensors
def _dense(g: Graph, src) -> str:
    return g.init(_f32(src.edge_tensor()), "edges")


def _quant(g: Graph, src) -> str:
    """``(q - zero) * scale`` as DequantizeLinear: per tensor, per output node (axis 0) or per edge
    (blocked along the edge vector)."""
    bits, signed = _bits(next(it for it in src.storage() if it.name == "q").encoding)
    q = g.ints(src.q, bits, signed, "q")
    out, inp, e = src.shape
    # the scale (and zero point) written at the shape DequantizeLinear wants: a scalar per tensor, [out]
    # per output node (axis 0), [out, in, 1] per edge (blocks of the whole edge vector)
    shape, attrs = {"layer": ([], {}), "node": ([out], {"axis": 0}),
                    "edge": ([out, inp, 1], {"axis": 2, "block_size": e})}[src.granularity]
    args = [q, g.floats(src.scale.reshape(shape), "scale")]  # float32: DequantizeLinear outputs its scale's type
    if src.zero is not None:
        args.append(g.ints(src.zero.reshape(shape), bits, False, "zero"))
    return g.op("DequantizeLinear", *args, **attrs)


def _centroids(g: Graph, src) -> str:
    """``[K, n+1]`` float32 centroids from what the codebook stores."""
    bits = src.centroid_bits
    if bits >= 16:
        c = src.centroids.detach()
        return g.floats(c.half() if bits == 16 else c, "centroids")
    codes = g.ints(src.centroid_codes().detach().long(), bits, True, "centroid_codes")
    scale = g.floats(src.centroid_scale, "centroid_scale")
    if src.centroid_scale.numel() == 1:
        return g.op("DequantizeLinear", codes, g.op("Reshape", scale, g.const([], np.int64)))
    return g.op("DequantizeLinear", codes, scale, axis=0)


def _codebook(g: Graph, src, shared: dict) -> str:
    from bench.compression.codebook import SharedCodebookSource
    from bench.model.sources import index_bits

    if isinstance(src, SharedCodebookSource):  # the owner writes the centroids, every sharer reuses them
        key = src.share_token
        if key not in shared:
            shared[key] = _centroids(g, src)
        cent = shared[key]
    else:
        cent = _centroids(g, src)
    idx = g.index(src.index, index_bits(src.k), "index")
    rows = g.op("Gather", cent, idx, axis=0)  # [out, in, n+1] or [kept, n+1]
    if hasattr(src, "flat_index"):  # a codebook over a pruned layer
        return _scatter(g, src, rows)
    return rows


def _positions(g: Graph, src) -> str:
    """The surviving edges' flat positions ``[kept, 1]`` (INT64) from the stored pattern."""
    from bench.compression.storage import pack_bits

    item = src.pattern_item()
    n = src.out_features * src.in_features
    if src.pattern == "mask":
        packed = np.frombuffer(pack_bits(_np(item.tensor).reshape(-1), 1), dtype=np.uint8)
        flat = _bit_planes(g, g.init(packed, "mask_bits"), n)
        return g.op("Transpose", g.op("NonZero", g.op("Cast", flat, to=g.T.BOOL)))          # [kept, 1]
    bits = int(item.encoding[4:])
    pos = g.index(src.flat_index, bits, "positions")
    return g.op("Unsqueeze", pos, g.const([1], np.int64))


def _scatter(g: Graph, src, rows: str) -> str:
    """``rows [kept, n+1]`` into zeros ``[out * in, n+1]`` at the stored positions, as ``[out, in, n+1]``."""
    out, inp, e = src.shape
    zeros = g.op("ConstantOfShape", g.const([out * inp, e], np.int64),
                 value=g.helper.make_tensor("zero", g.T.FLOAT, [1], [0.0]))
    full = g.op("ScatterND", zeros, _positions(g, src), rows)
    return g.op("Reshape", full, g.const([out, inp, e], np.int64))


def _masked(g: Graph, src) -> str:
    return _scatter(g, src, g.floats(src.values, "values"))


def _tucker(g: Graph, src) -> str:
    f = src.factors()
    return g.op("Einsum", *(g.floats(f[k], k) for k in ("core", "u_out", "u_in", "u_basis")),
                equation="abc,oa,ib,ec->oie")


def _generated(g: Graph, src, shared: dict) -> str:
    """MetaKAN: the meta-learner applied to every edge's embedding, ``[out * in, d] -> [out * in, n+1]``."""
    key = src.share_token or id(src.learner)
    if key not in shared:
        lr = src.learner
        shared[key] = [g.floats(t, n) for n, t in (("fc1_w", lr.fc1.weight), ("fc1_b", lr.fc1.bias),
                                                    ("fc2_w", lr.fc2.weight), ("fc2_b", lr.fc2.bias))]
    w1, b1, w2, b2 = shared[key]
    h = g.op("Relu", g.op("Gemm", g.floats(src.embedding, "embedding"), w1, b1, transB=1))
    return g.op("Reshape", g.op("Gemm", h, w2, b2, transB=1), g.const(list(src.shape), np.int64))


def _branch(g: Graph, src, shared: dict, export: OnnxExport, where: str) -> str:
    parts = [_edges(g, part, shared, export, f"{where}.{name}") for name, part in src.parts()]
    return g.op("Concat", *parts, axis=2)


def _edges(g: Graph, src, shared: dict, export: OnnxExport, where: str) -> str:
    """The float32 ``[out, in, n+1]`` edge tensor of ``src`` rebuilt from its stored form."""
    from bench.compression.codebook import MaskedCodebookSource
    from bench.compression.entropy import EntropyCodedSource
    from bench.compression.generated import GeneratedSource
    from bench.compression.pruning import MaskedSource
    from bench.compression.quant import BranchSource, QuantSource
    from bench.compression.tucker_factors import TuckerSource
    from bench.model.sources import CodebookSource, DenseSource

    if hasattr(src, "freeze"):  # QAT forms (and branches of them) are stored as the quantised source they freeze to
        src = src.freeze()
    if isinstance(src, EntropyCodedSource):
        export.notes.append(f"{where}: entropy-coded {', '.join(sorted(src.names))} written at plain width "
                            "(ONNX operators cannot decode an ANS stream)")
        return _edges(g, src.inner, shared, export, where)
    name = type(src).__name__
    form = "compressed"
    if isinstance(src, DenseSource):
        w, form = _dense(g, src), "dense"
    elif isinstance(src, QuantSource):
        w = _quant(g, src)
    elif isinstance(src, (CodebookSource, MaskedCodebookSource)):
        w = _codebook(g, src, shared)
    elif isinstance(src, MaskedSource):
        w = _masked(g, src)
    elif isinstance(src, TuckerSource):
        w = _tucker(g, src)
    elif isinstance(src, GeneratedSource):
        w = _generated(g, src, shared)
    elif isinstance(src, BranchSource):
        return _branch(g, src, shared, export, where)
    else:  # no ONNX form for this source: its dense edge tensor, said in the export's forms
        w, form = _dense(g, src), "dense (no ONNX form for this source)"
    export.forms[where] = f"{name}: {form}"
    return w


# ----------------------------------------------------------------------------- features
def _features(g: Graph, layer: KANLayer, x: str, where: str) -> str:
    """``x [N, in]`` -> the layer's features ``[N, in, n+1]`` (basis values, then silu(x))."""
    basis = layer.basis
    unsq = g.const([-1], np.int64)
    name = basis.name
    if name == "bspline":
        values = _bspline(g, basis, x)
    elif name == "rbf":
        xn = x
        if basis.use_norm:
            n = basis.norm
            xn = g.op("LayerNormalization", x, g.param(n.weight, "ln_w"), g.param(n.bias, "ln_b"), axis=-1,
                      epsilon=float(n.eps))
        z = g.op("Mul", g.op("Sub", g.op("Unsqueeze", xn, unsq), g.const(_f32(basis.centers))),
                 g.const(basis.inv_width))
        values = g.op("Exp", g.op("Neg", g.op("Mul", z, z)))
    elif name in ("chebyshev", "gram", "kagn"):
        values = _polynomials(g, basis, x)
    elif name == "fourier":
        a = g.op("Mul", g.op("Unsqueeze", g.op("Mul", g.op("Tanh", x), g.const(math.pi)), unsq),
                 g.const(_f32(basis.k)))
        values = g.op("Concat", g.op("Cos", a), g.op("Sin", a), axis=-1)
    else:
        raise ExportRefused(f"{where}: basis {name!r} has no ONNX form (built in: bspline, rbf, chebyshev, gram, "
                            "kagn, fourier)")
    return g.op("Concat", values, g.op("Unsqueeze", g.silu(x), unsq), axis=-1)


def _bspline(g: Graph, basis, x: str) -> str:
    unsq = g.const([-1], np.int64)
    lo, hi, G, k = basis.lo, basis.hi, basis.grid_size, basis.order
    if basis.closed_form:  # the uniform cubic, as bench.model.bases._cubic_formula
        h = (hi - lo) / G
        xc = x if basis.extrapolate else g.op("Clip", x, g.const(lo), g.const(hi - 1e-6 * (hi - lo)))
        u = g.op("Add", g.op("Mul", g.op("Sub", xc, g.const(lo)), g.const(1.0 / h)), g.const(3.0))
        a = g.op("Abs", g.op("Sub", g.op("Unsqueeze", u, unsq), g.const(_f32(basis.offsets))))
        far = g.op("Relu", g.op("Sub", g.const(2.0), a))
        near = g.op("Relu", g.op("Sub", g.const(1.0), a))
        cube = lambda v: g.op("Mul", g.op("Mul", v, v), v)  # noqa: E731
        return g.op("Mul", g.op("Sub", cube(far), g.op("Mul", cube(near), g.const(4.0))), g.const(1.0 / 6.0))
    # Cox-de Boor on the knots (shared [M] or per input [in, M]), step for step as
    # bench.model.bases.cox_de_boor (and pykan): divide by the knot differences, then nan_to_num (0/0 and
    # inf*0 from repeated knots are 0; inf is the largest float). Shared knots are a few constants;
    # per-input knots are data (counted), stored once: their slices and differences are nodes on that one
    # initializer, which onnxruntime folds when the session loads (in memory, not in the file).
    tn = basis.knots.detach().cpu().double().numpy()
    m = tn.shape[-1]
    last = g.const([-1], np.int64)
    if basis.knot_mode == "per_input":
        t = g.floats(basis.knots.detach().float(), "knots")  # [in, M]

        def cols(a: int, b: int) -> str:
            return g.op("Slice", t, g.const([a], np.int64), g.const([b], np.int64), last)

        def diff(a: int, b: int, c: int, d: int) -> str:  # t[..., a:b] - t[..., c:d]
            return g.op("Sub", cols(a, b), cols(c, d))

        if not basis.extrapolate:  # each input clamped into its own [t_k, t_{G+k})
            lo_v, hi_v = (g.op("Squeeze", cols(c, c + 1), last) for c in (k, k + G))
            x = g.op("Min", g.op("Max", x, lo_v), g.op("Sub", hi_v, g.op("Mul", g.op("Sub", hi_v, lo_v),
                                                                            g.const(1e-6))))
    else:
        t32 = tn.astype(np.float32)

        def cols(a: int, b: int) -> str:
            return g.const(t32[..., a:b])

        def diff(a: int, b: int, c: int, d: int) -> str:
            return g.const(t32[..., a:b] - t32[..., c:d])

        if not basis.extrapolate:
            x = g.op("Clip", x, g.const(lo), g.const(hi - 1e-6 * (hi - lo)))
    xu = g.op("Unsqueeze", x, unsq)  # [N, in, 1]
    inside = g.op("And", g.op("GreaterOrEqual", xu, cols(0, m - 1)), g.op("Less", xu, cols(1, m)))
    b = g.op("Cast", inside, to=g.T.FLOAT)  # order 0: half-open indicators
    for p in range(1, k + 1):
        left = g.op("Div", g.op("Sub", xu, cols(0, m - p - 1)), diff(p, m - 1, 0, m - p - 1))
        right = g.op("Div", g.op("Sub", cols(p + 1, m), xu), diff(p + 1, m, 1, m - p))
        n = m - p  # columns of b now
        b_lo = g.op("Slice", b, g.const([0], np.int64), g.const([n - 1], np.int64), last)
        b_hi = g.op("Slice", b, g.const([1], np.int64), g.const([n], np.int64), last)
        v = g.op("Add", g.op("Mul", left, b_lo), g.op("Mul", right, b_hi))
        big = g.const(float(np.finfo(np.float32).max))
        b = g.op("Where", g.op("IsNaN", v), g.const(0.0), g.op("Clip", v, g.op("Neg", big), big))
    return b


def _polynomials(g: Graph, basis, x: str) -> str:
    """Chebyshev / Gram of the squashed input, or KAGN's learned recurrence (then silu), stacked."""
    unsq = g.const([-1], np.int64)
    name = basis.name
    t = g.op("Tanh", x)
    if name != "kagn":
        t = g.op("Clip", t, g.const(-1.0 + basis.margin), g.const(1.0 - basis.margin))
    ones = g.op("Add", g.op("Mul", t, g.const(0.0)), g.const(1.0))
    polys = [ones, t][: basis.degree + 1]
    if name == "chebyshev":
        for _ in range(2, basis.degree + 1):
            polys.append(g.op("Sub", g.op("Mul", g.op("Mul", t, polys[-1]), g.const(2.0)), polys[-2]))
    elif name == "gram":
        m = basis.degree + 1
        for n in range(1, basis.degree):
            beta = n * n * (m * m - n * n) / (m * m * (4 * n * n - 1))
            polys.append(g.op("Sub", g.op("Mul", t, polys[-1]), g.op("Mul", polys[-2], g.const(beta))))
    else:
        beta = basis.beta.detach().cpu().float().numpy()
        for n in range(1, basis.degree):
            c = float(beta[n]) * (n * n * (2 * n + 1) * (4 * n * n - 1) / (n + 1) ** 2)
            polys.append(g.op("Sub", g.op("Mul", t, polys[-1]), g.op("Mul", polys[-2], g.const(c))))
    stacked = g.op("Concat", *(g.op("Unsqueeze", p, unsq) for p in polys), axis=-1)
    return g.silu(stacked) if name == "kagn" else stacked


# ----------------------------------------------------------------------------- layers and models
def _kan_layer(g: Graph, layer: KANLayer, x: str, shared: dict, export: OnnxExport, where: str) -> str:
    feats = _features(g, layer, x, where)
    flat = g.op("Reshape", feats, g.const([0, -1], np.int64))
    w = _edges(g, layer.source, shared, export, where)
    w2 = g.op("Reshape", w, g.const([layer.out_features, -1], np.int64))
    y = g.op("Gemm", flat, w2, transB=1)
    if layer.bias is not None:
        y = g.op("Add", y, g.param(layer.bias, "bias"))
    if layer.norm_kind == "layer":
        y = g.op("LayerNormalization", y, g.param(layer.norm.weight, "ln_w"), g.param(layer.norm.bias, "ln_b"),
                 axis=-1, epsilon=float(layer.norm.eps))
    return g.silu(y) if layer.act_kind == "silu" else y


def _conv(g: Graph, conv: KANConv2d, x: str, shared: dict, export: OnnxExport, where: str) -> str:
    """A KAN convolution as im2col-free ONNX: pointwise features per pixel then one ``Conv`` (the
    PyTorch fast path); a basis that mixes a pixel's channels (RBF with LayerNorm) over unfolded patches."""
    layer, k, c = conv.kan, conv.kernel, conv.in_channels
    n1 = layer.edge_dim
    if not conv.fast:
        return _conv_unfold(g, conv, x, shared, export, where)
    if conv.pad == "input" and conv.padding:
        x = g.op("Pad", x, g.const([0, 0, conv.padding, conv.padding] * 2, np.int64))
        pad = 0
    else:
        pad = conv.padding
    # [B, C, H, W] -> pixels [B*H*W, C] -> features [B*H*W, C, n1] -> [B, C*n1, H, W] (channel-major)
    shape = g.op("Shape", x)
    pix = g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 3, 1]), g.const([-1, c], np.int64))
    feats = _features(g, layer, pix, where)
    b_h_w = g.op("Gather", shape, g.const([0, 2, 3], np.int64), axis=0)
    nhwc = g.op("Reshape", feats, g.op("Concat", b_h_w, g.const([c * n1], np.int64), axis=0))
    nchw = g.op("Transpose", nhwc, perm=[0, 3, 1, 2])
    w = _edges(g, layer.source, shared, export, where)  # [out, C*k*k, n1] (channel, row, column)
    w = g.op("Transpose", g.op("Reshape", w, g.const([conv.out_channels, c, k, k, n1], np.int64)), perm=[0, 1, 4, 2, 3])
    w = g.op("Reshape", w, g.const([conv.out_channels, c * n1, k, k], np.int64))
    args = [nchw, w] + ([g.param(layer.bias, "bias")] if layer.bias is not None else [])
    return g.op("Conv", *args, kernel_shape=[k, k], strides=[conv.stride] * 2, pads=[pad] * 4)


def _conv_unfold(g: Graph, conv: KANConv2d, x: str, shared: dict, export: OnnxExport, where: str) -> str:
    """:meth:`KANConv2d.forward_unfold` (``pad="input"``): the patches as the channels of a grouped ``Conv``
    whose one-hot weight copies input ``(channel, row, column)`` to channel ``channel*k*k + row*k + column``
    (``F.unfold``'s order; exact: one product by 1, the rest by 0), then the KAN layer on every patch."""
    k, c = conv.kernel, conv.in_channels
    eye = np.tile(np.eye(k * k, dtype=np.float32).reshape(k * k, 1, k, k), (c, 1, 1, 1))  # [c*k*k, 1, k, k]
    p = g.op("Conv", x, g.const(eye), kernel_shape=[k, k], strides=[conv.stride] * 2, pads=[conv.padding] * 4,
             group=c)
    b_h_w = g.op("Gather", g.op("Shape", p), g.const([0, 2, 3], np.int64), axis=0)
    rows = g.op("Reshape", g.op("Transpose", p, perm=[0, 2, 3, 1]), g.const([-1, c * k * k], np.int64))
    y = _kan_layer(g, conv.kan, rows, shared, export, where)  # [B*Ho*Wo, out]
    y = g.op("Reshape", y, g.op("Concat", b_h_w, g.const([conv.out_channels], np.int64), axis=0))
    return g.op("Transpose", y, perm=[0, 3, 1, 2])


def _module(g: Graph, m: nn.Module, x: str, shared: dict, export: OnnxExport, where: str) -> str:
    """One module of a ConvKAN's sequence (its KAN convolutions, norms, pooling, activations)."""
    if isinstance(m, KANConv2d):
        return _conv(g, m, x, shared, export, where)
    if isinstance(m, KANLayer):
        return _kan_layer(g, m, x, shared, export, where)
    if isinstance(m, nn.Sequential):
        for name, sub in m.named_children():
            x = _module(g, sub, x, shared, export, f"{where}.{name}")
        return x
    if isinstance(m, nn.BatchNorm2d):
        return g.op("BatchNormalization", x, g.param(m.weight, "bn_w"), g.param(m.bias, "bn_b"),
                    g.param(m.running_mean, "bn_mean"), g.param(m.running_var, "bn_var"), epsilon=float(m.eps))
    if isinstance(m, nn.InstanceNorm2d):
        c = m.num_features
        scale = g.param(m.weight, "in_w") if m.affine else g.const(np.ones(c))
        bias = g.param(m.bias, "in_b") if m.affine else g.const(np.zeros(c))
        return g.op("InstanceNormalization", x, scale, bias, epsilon=float(m.eps))
    if isinstance(m, nn.GroupNorm):
        return g.op("GroupNormalization", x, g.param(m.weight, "gn_w"), g.param(m.bias, "gn_b"),
                    num_groups=m.num_groups, epsilon=float(m.eps))
    if isinstance(m, nn.MaxPool2d):
        ks = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        st = m.stride if isinstance(m.stride, int) else m.stride[0]
        return g.op("MaxPool", x, kernel_shape=[ks, ks], strides=[st, st])
    if isinstance(m, nn.AvgPool2d):
        ks = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        st = m.stride if isinstance(m.stride, int) else m.stride[0]
        return g.op("AveragePool", x, kernel_shape=[ks, ks], strides=[st, st])
    if isinstance(m, nn.SiLU):
        return g.silu(x)
    if isinstance(m, nn.ReLU):
        return g.op("Relu", x)
    if isinstance(m, nn.Identity):
        return x
    raise ExportRefused(f"{where}: {type(m).__name__} has no ONNX form here")


def _graph_of(model: nn.Module, g: Graph, x: str, export: OnnxExport) -> str:
    shared: dict = {}
    if isinstance(model, KAN):
        h = g.op("Flatten", x, axis=1)
        for i, layer in enumerate(model.layers):
            h = _kan_layer(g, layer, h, shared, export, f"layers.{i}")
        return h
    if isinstance(model, ConvKAN):
        return _convkan(g, model, x, shared, export)
    raise ExportRefused(f"{type(model).__name__} has no ONNX export (KAN and ConvKAN only)")


def _convkan(g: Graph, model: ConvKAN, x: str, shared: dict, export: OnnxExport) -> str:
    h = _module(g, model.features, x, shared, export, "features")
    if getattr(model, "head", None) is None:
        return h
    h = g.op("ReduceMean", h, g.const([2, 3], np.int64), keepdims=0)  # global average pooling
    return _module(g, model.head, h, shared, export, "head")


def input_shape(model: nn.Module) -> list:
    """The ONNX input's shape (``"batch"`` first): ``[batch, widths[0]]`` for a KAN (images flattened
    by the caller or not: the graph flattens), ``[batch, C, H, W]`` for a ConvKAN."""
    if isinstance(model, ConvKAN):
        return ["batch", *model.input_shape]
    if isinstance(model, KAN):
        return ["batch", model.widths[0]]
    raise ExportRefused(f"{type(model).__name__} has no ONNX export (KAN and ConvKAN only)")


def output_shape(model: nn.Module) -> list:
    """``[batch, outputs]`` (a ConvKAN without a head: its feature maps, shape left open)."""
    if isinstance(model, KAN):
        return ["batch", model.widths[-1]]
    if getattr(model, "head", None) is not None:
        return ["batch", model.n_outputs]
    return ["batch", "channels", "height", "width"]


def export_onnx(model: nn.Module, path: str | Path) -> OnnxExport:
    """Write ``model`` (a KAN or ConvKAN, any sources) to ``path`` as ONNX (opset 21), each layer in its
    compressed form; returns what was written. :class:`ExportRefused` (one line) where a part has no
    exact ONNX form."""
    import onnx

    path = Path(path)
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        raise ExportRefused("ONNX export writes float32 models; convert the model with .float() first")
    counted = storage_report(model).stored_bits / 8
    export = OnnxExport(path, 0, counted)
    g = Graph()
    g.small_dtype = getattr(model, "small_dtype", None)
    shape = input_shape(model)
    x = g.helper.make_tensor_value_info("x", g.T.FLOAT, shape)
    with torch.no_grad():
        y = _graph_of(model.eval(), g, "x", export)
    out = g.helper.make_tensor_value_info("y", g.T.FLOAT, output_shape(model))
    g.nodes.append(g.helper.make_node("Identity", [y], ["y"]))
    onnx_model = g.model([x], [out], f"{type(model).__name__} exported by kan-compression-bench; "
                                     f"forms: {export.forms}")
    onnx.checker.check_model(onnx_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx_model.SerializeToString())
    export.bytes = path.stat().st_size
    return export


def check_onnx(model: nn.Module, path: str | Path, x: torch.Tensor) -> float:
    """Largest ``|onnxruntime(x) - model(x)|`` (CPU), relative to ``max(1, max |model(x)|)``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model.eval()(x).float().cpu().numpy()
    if isinstance(model, KAN):  # the graph's input is [batch, widths[0]]: images flattened
        x = x.reshape(x.shape[0], -1)
    elif isinstance(model, ConvKAN) and x.dim() == 2:
        x = x.reshape(x.shape[0], *model.input_shape)
    got = sess.run(None, {"x": x.detach().cpu().float().numpy()})[0]
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def onnx_row(model: nn.Module, path: str | Path, x: torch.Tensor) -> dict:
    """A results row's ONNX columns: the file's size and its largest relative difference from the
    model on ``x`` under onnxruntime, or why no file could be made (recorded, never raised)."""
    try:
        export = export_onnx(model, path)
        diff = check_onnx(model, path, x)
    except ExportRefused as exc:
        return {"onnx_bytes": None, "onnx_max_diff": None, "onnx_error": str(exc)}
    except ImportError as exc:
        return {"onnx_bytes": None, "onnx_max_diff": None, "onnx_error": f"onnx/onnxruntime not installed ({exc})"}
    except Exception as exc:  # noqa: BLE001 - an export that cannot be made is recorded with its reason
        first = (str(exc).strip().splitlines() or [""])[0]
        if len(first) > 400:  # onnxruntime puts the file's path and its source location first, the reason last
            first = f"{first[:150]} ... {first[-250:]}"
        return {"onnx_bytes": None, "onnx_max_diff": None, "onnx_error": f"{type(exc).__name__}: {first}"}
    return {"onnx_bytes": export.bytes, "onnx_max_diff": diff, "onnx_error": None}
