"""KAN layers and models.

A KAN layer computes, for every output ``o``,

    y_o = b_o + sum_i [ w[o,i,n] * silu(x_i) + sum_{k<n} w[o,i,k] * phi_k(x_i) ]

where ``w[o, i, :]`` is edge (o, i)'s **edge vector** (``n_basis`` coefficients, then the
base-branch weight). The layer's edge tensor ``[out, in, n_basis + 1]`` comes from a swappable
coefficient source (:mod:`bench.model.sources`); compression methods replace the source, never the
layer. The forward evaluates the basis once per input (``[B, in, n_basis]``), appends
``silu(x)`` and hands the ``[B, in, n_basis + 1]`` features to ``source.contract`` (one matmul):
``[B, out, in]`` is never built.

Public API: ``KAN([784, 64, 10], basis="rbf")``, ``ConvKAN((1, 28, 28), 10, channels=[8, 16])``,
:func:`kan_layers` to walk a model's KAN layers (:func:`bench.model.kinds.from_config` rebuilds from ``config()``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UserError

from .bases import basis_major, fused_features, make_basis
from .sources import DenseSource, EdgeSource


def _init_edges(n_basis: int, fan_in: int):
    def init(w: torch.Tensor) -> None:
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.normal_(w[..., :n_basis], 0.0, 0.5 * bound)
        nn.init.uniform_(w[..., n_basis], -bound, bound)

    return init


LAYER_NORMS = ("none", "layer")
ACTS = ("none", "silu")


def _activation(kind: str, what: str) -> nn.Module:
    if kind not in ACTS:
        raise UserError(f"{what} must be one of {', '.join(ACTS)}; got {kind!r}")
    return nn.SiLU() if kind == "silu" else nn.Identity()


class KANLayer(nn.Module):
    """A fully connected KAN layer ``[B, in] -> [B, out]`` with a swappable edge source.

    Options an import needs (defaults: none of them): ``bias=False`` (efficient-kan, ChebyKAN, KAGN
    store none), ``norm="layer"`` (a LayerNorm over the outputs) and ``act="silu"`` after it
    (torch-conv-kan's ``GRAMLayer`` ends in both; a LayerNorm between ChebyKAN layers is the previous
    layer's ``norm``)."""

    def __init__(self, in_features: int, out_features: int, basis: str = "bspline",
                 basis_kwargs: dict | None = None, bias: bool = True, norm: str = "none", act: str = "none"):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise UserError(f"KAN layer sizes must be >= 1, got in={in_features}, out={out_features}")
        if norm not in LAYER_NORMS:
            raise UserError(f"KAN layer norm must be one of {', '.join(LAYER_NORMS)}; got {norm!r}")
        self.in_features, self.out_features = in_features, out_features
        self.basis = make_basis(basis, in_features, **(basis_kwargs or {}))
        self.n_basis = self.basis.n_basis
        self.source: EdgeSource = DenseSource(out_features, in_features, self.n_basis + 1,
                                              init=_init_edges(self.n_basis, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.norm_kind, self.act_kind = norm, act
        if norm == "layer":
            self.norm = nn.LayerNorm(out_features)
        if act != "none":
            self.act = _activation(act, "KAN layer act")

    @property
    def edge_dim(self) -> int:
        return self.n_basis + 1

    def edge_tensor(self) -> torch.Tensor:
        """The canonical ``[out, in, n_basis + 1]`` edge tensor (from the current source)."""
        return self.source.edge_tensor()

    def set_source(self, source: EdgeSource) -> None:
        if tuple(source.shape) != (self.out_features, self.in_features, self.edge_dim):
            raise ValueError(f"source shape {tuple(source.shape)} does not match layer "
                             f"{(self.out_features, self.in_features, self.edge_dim)}")
        # the layer's device (its current source, basis, bias): a source built from CPU tensors for a CUDA
        # model (indices, a clip, random factors) lands where the rest of the model is
        here = next((t.device for t in (*self.parameters(), *self.buffers())), None)
        self.source = source if here is None else source.to(here)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in] -> [B, in, n_basis + 1]``: the basis values, then silu(x), fused by torch.compile
        wherever a compiler works (:func:`bench.model.bases.fused_features`), else eagerly."""
        fused = fused_features(self.basis, x)
        return fused if fused is not None else self.basis.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.source.contract(self.features(x))
        return self.finish(y if self.bias is None else y + self.bias)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's norm and activation on ``y = contract + bias``."""
        if self.norm_kind != "none":
            y = self.norm(y)
        return y if self.act_kind == "none" else self.act(y)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, basis={self.basis.name}, n_basis={self.n_basis}"


def per_layer(value, n: int, what: str) -> list:
    """``value`` for each of ``n`` layers: a list of ``n`` entries as given, anything else repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"{what} needs one entry per layer ({n}); got {len(value)}")
        return list(value)
    return [value] * n


class KAN(nn.Module):
    """A stack of KAN layers, ``widths = [in, hidden..., out]``. Inputs with more than two
    dimensions are flattened, so ``KAN([784, 64, 10])`` takes ``[B, 1, 28, 28]`` images too.

    ``basis_kwargs`` is one dict for every layer or a list with one per layer (pykan's per-layer grid
    and order); ``bias``, ``norms`` and ``acts`` are one value or one per layer (:class:`KANLayer`).
    Options left at their defaults are not written into :meth:`config`, so existing configs (and the
    run ids and files made from them) do not change."""

    def __init__(self, widths: list[int], basis: str = "bspline", basis_kwargs: dict | list | None = None,
                 bias: bool | list[bool] = True, norms: str | list[str] = "none", acts: str | list[str] = "none"):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise UserError(f"KAN widths must be >= 2 positive sizes, got {widths}")
        n = len(widths) - 1
        kwargs = per_layer(basis_kwargs, n, "KAN basis_kwargs")
        self.widths, self.basis_name = widths, basis
        self.basis_kwargs = [dict(k or {}) for k in basis_kwargs] if isinstance(basis_kwargs, (list, tuple)) \
            else dict(basis_kwargs or {})
        self.bias, self.norms, self.acts = (per_layer(bias, n, "KAN bias"), per_layer(norms, n, "KAN norms"),
                                            per_layer(acts, n, "KAN acts"))
        self.layers = nn.ModuleList(KANLayer(a, b, basis, kw, bias=bb, norm=nm, act=ac) for a, b, kw, bb, nm, ac
                                    in zip(widths[:-1], widths[1:], kwargs, self.bias, self.norms, self.acts))

    def config(self) -> dict:
        cfg = {"model": "kan", "widths": self.widths, "basis": self.basis_name, "basis_kwargs": self.basis_kwargs}
        if not all(self.bias):
            cfg["bias"] = self.bias
        if any(v != "none" for v in self.norms):
            cfg["norms"] = self.norms
        if any(v != "none" for v in self.acts):
            cfg["acts"] = self.acts
        return cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = layer(x)
        return x


class KANConv2d(nn.Module):
    """KAN convolution: each output channel is a KAN over the ``in_channels * kernel^2`` values of
    a patch, so the edge tensor is ``[out_channels, in_channels * kernel^2, n_basis + 1]`` (patch
    inputs ordered channel, row, column, as ``F.unfold`` lays them out).

    Forward (the torch-conv-kan idea): with a pointwise basis (:attr:`bench.model.bases.Basis.pointwise`)
    a pixel's basis values are the same in every patch that contains it, so the basis is evaluated
    once per (zero-padded) input pixel, ``[B, C * (n_basis + 1), H, W]``, and one standard
    ``conv2d`` applies the edge tensor viewed as ``[out, C * (n_basis + 1), k, k]``: ``k^2`` times
    fewer basis evaluations than unfolding, and no ``[B * L, C * k^2, n_basis + 1]`` patch tensor.
    A basis that mixes a row's inputs (RBF with LayerNorm) keeps :meth:`forward_unfold`, the
    reference both paths are tested against. Every source works unchanged: the weight is the
    source's ``edge_tensor()`` (a codebook or quantised source decompresses it once per forward).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1,
                 padding: int | None = None, basis: str = "bspline", basis_kwargs: dict | None = None,
                 pad: str = "input", bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel, self.stride = in_channels, out_channels, kernel, stride
        self.padding = kernel // 2 if padding is None else padding
        if pad not in PADS:
            raise UserError(f"convkan pad must be one of {', '.join(PADS)}; got {pad!r}")
        self.pad = pad
        self.kan = KANLayer(in_channels * kernel * kernel, out_channels, basis, basis_kwargs, bias=bias)
        if pad == "features" and not self.fast:
            raise UserError(f"convkan pad 'features' needs a pointwise basis; {self.kan.basis.name} with these "
                            "options mixes a patch's inputs")

    @property
    def fast(self) -> bool:
        return bool(self.kan.basis.pointwise)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The rows the inner KAN layer sees: ``[B * L, C * k^2]`` (L output positions)."""
        p = F.unfold(x, self.kernel, padding=self.padding, stride=self.stride)  # [B, C*k*k, L]
        return p.transpose(1, 2).reshape(-1, p.shape[1])

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        return ((h + 2 * self.padding - self.kernel) // self.stride + 1,
                (w + 2 * self.padding - self.kernel) // self.stride + 1)

    def pixel_features(self, x: torch.Tensor, any_order: bool = False) -> tuple[torch.Tensor, bool]:
        """The basis values and silu of every pixel, ``[B, C * (n_basis + 1), H, W]``, and whether its
        channels are basis-major (``(n_basis + 1) * C``, what compiled features give when ``any_order``:
        no copy) rather than channel-major (``C * (n_basis + 1)``)."""
        b, c, h, w = x.shape
        n1 = self.kan.edge_dim
        feats = self.kan.features(x.permute(0, 2, 3, 1).reshape(-1, c))  # [B*H*W, C, n+1]
        if basis_major(feats):
            feats = feats.transpose(1, 2).reshape(b, h, w, n1 * c).permute(0, 3, 1, 2)  # a view
            if any_order:
                return feats, True
            return feats.reshape(b, n1, c, h, w).transpose(1, 2).reshape(b, c * n1, h, w), False
        return feats.reshape(b, h, w, c * n1).permute(0, 3, 1, 2), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self.forward_unfold(x)
        c, k, n1 = x.shape[1], self.kernel, self.kan.edge_dim
        if self.pad == "input":  # pad the inputs: the basis sees the zeros
            (feats, by_basis), padding = self.pixel_features(F.pad(x, (self.padding,) * 4), True), 0
        else:  # pad the features with zeros (torch-conv-kan)
            (feats, by_basis), padding = self.pixel_features(x, True), self.padding
        weight = self.kan.edge_tensor().to(feats.dtype).reshape(self.out_channels, c, k, k, n1)
        weight = weight.permute(0, 4, 1, 2, 3) if by_basis else weight.permute(0, 1, 4, 2, 3)
        return F.conv2d(feats, weight.reshape(self.out_channels, c * n1, k, k), self.kan.bias, stride=self.stride,
                        padding=padding)

    def forward_unfold(self, x: torch.Tensor) -> torch.Tensor:
        """The reference forward: unfold the patches and apply the KAN layer to every row (with
        ``pad="features"``: unfold the zero-padded per-pixel features and contract them)."""
        b, c, h, w = x.shape
        ho, wo = self._out_size(h, w)
        if self.pad == "input":
            y = self.kan(self.patches(x))  # [B*L, out]
        else:
            n1, k = self.kan.edge_dim, self.kernel
            p = F.unfold(self.pixel_features(x)[0], k, padding=self.padding, stride=self.stride)  # [B, C*n1*k*k, L]
            rows = p.transpose(1, 2).reshape(-1, c, n1, k * k).transpose(2, 3).reshape(-1, c * k * k, n1)
            y = self.kan.source.contract(rows)
            y = y if self.kan.bias is None else y + self.kan.bias
        return y.reshape(b, ho * wo, self.out_channels).transpose(1, 2).reshape(b, self.out_channels, ho, wo)


PADS = ("input", "features")
NORMS = ("batch", "instance", "instance_noaffine", "layer", "none")


def channel_norm(kind: str, channels: int) -> nn.Module:
    """The normalisation after a KAN convolution: ``batch`` (BatchNorm2d: affine + running
    statistics, all stored), ``instance`` (InstanceNorm2d with affine), ``instance_noaffine``
    (InstanceNorm2d with nothing stored: torch-conv-kan's default), ``layer`` (GroupNorm with
    one group: per-sample LayerNorm over channels and pixels) or ``none``."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "instance_noaffine":
        return nn.InstanceNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise UserError(f"convkan norm must be one of {', '.join(NORMS)}; got {kind!r}")


class ConvKAN(nn.Module):
    """KAN convolutions, each followed by a normalisation (``norm``) and, every ``pool_every``
    layers (0: never) while the feature map is at least 4 pixels wide, 2x2 max-pooling; then
    global average pooling and a KAN head.

    ``strides`` (one per layer, default 1) with ``pool_every = 0`` gives the MetaKAN / torch-conv-kan
    8-layer ConvKAN: ``channels = [16, 32, 64, 128, 256, 256, 512, 512]``, ``strides = [1, 2, 2, 1, 1,
    2, 1, 1]``, 3x3 kernels with padding 1 and BatchNorm after every convolution (MetaKAN's
    ``EightSimpleMetaConvKAN``).

    ``norm = "batch"`` by default: deep KAN-convolution stacks without normalisation drift off their
    basis grid and collapse (torch-conv-kan reports such runs at chance level), and BatchNorm is
    what MetaKAN and torch-conv-kan use. Measured (Fashion-MNIST, 12k training images, 3 epochs,
    ``[16, 32, 64]``, bspline, one seed, lr 3e-3 with a cosine schedule):
    validation 87.97 % batch, 88.40 % instance, 81.6 % layer, 79.3 % none. Its parameters and
    running statistics are stored and counted at their dtype. With a normalisation, an ``rbf``
    basis in the convolutions skips its own LayerNorm over the patch (inputs are already
    normalised per channel, as in torch-conv-kan's FastKAN convolution), which keeps the fast
    per-pixel convolution; set ``basis_kwargs.norm`` to override.

    Options an import of torch-conv-kan's KAGN convolutions needs (defaults: today's model, and left
    out of :meth:`config`): ``act="silu"`` after each norm, ``pad="features"`` (zero-pad the basis
    features, not the input), ``bias=False`` in the convolutions, ``norm="instance_noaffine"``;
    ``head=False`` ends at the last feature map (no pooling, no head: one bare KAN convolution);
    ``head_basis_kwargs``, ``head_bias``, ``head_norm``, ``head_act`` configure the head apart.
    """

    def __init__(self, input_shape: tuple[int, int, int], n_outputs: int, channels: list[int] = (8, 16),
                 kernel: int = 3, pool_every: int = 1, basis: str = "bspline", basis_kwargs: dict | None = None,
                 strides: list[int] | None = None, norm: str = "batch", act: str = "none", pad: str = "input",
                 bias: bool = True, padding: int | None = None, head: bool = True,
                 head_basis_kwargs: dict | None = None, head_bias: bool = True, head_norm: str = "none",
                 head_act: str = "none"):
        super().__init__()
        if len(input_shape) != 3:
            raise UserError(f"convkan needs image inputs [C, H, W], got input shape {tuple(input_shape)}")
        channels = [int(c) for c in channels]
        strides = [1] * len(channels) if strides is None else [int(v) for v in strides]
        if not channels or min(channels) < 1 or pool_every < 0 or kernel < 1:
            raise UserError(f"convkan needs channels >= 1, kernel >= 1, pool_every >= 0; got "
                            f"channels={channels}, kernel={kernel}, pool_every={pool_every}")
        if len(strides) != len(channels) or min(strides) < 1:
            raise UserError(f"convkan strides must be one integer >= 1 per layer ({len(channels)}); got {strides}")
        channel_norm(norm, 1)  # one line for an unknown norm
        self.input_shape, self.n_outputs, self.channels = tuple(int(s) for s in input_shape), int(n_outputs), channels
        self.kernel, self.pool_every, self.strides, self.norm = kernel, pool_every, strides, norm
        self.basis_name, self.basis_kwargs = basis, dict(basis_kwargs or {})
        self.options = {k: v for k, v, default in [
            ("act", act, "none"), ("pad", pad, "input"), ("bias", bias, True), ("padding", padding, None),
            ("head", head, True),
            ("head_basis_kwargs", head_basis_kwargs, None), ("head_bias", head_bias, True),
            ("head_norm", head_norm, "none"), ("head_act", head_act, "none")] if v != default}
        conv_kwargs = dict(self.basis_kwargs)
        if basis == "rbf" and norm != "none":
            conv_kwargs.setdefault("norm", False)
        blocks, c_in, size = [], self.input_shape[0], min(self.input_shape[1:])
        for i, (c, stride) in enumerate(zip(channels, strides)):
            blocks.append(KANConv2d(c_in, c, kernel, stride=stride, padding=padding, basis=basis,
                                    basis_kwargs=conv_kwargs, pad=pad, bias=bias))
            size = (size + 2 * blocks[-1].padding - kernel) // stride + 1
            if norm != "none":
                blocks.append(channel_norm(norm, c))
            if act != "none":
                blocks.append(_activation(act, "convkan act"))
            if pool_every and (i + 1) % pool_every == 0 and size >= 4:
                blocks.append(nn.MaxPool2d(2))
                size //= 2
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.head = KANLayer(c_in, n_outputs, basis, basis_kwargs if head_basis_kwargs is None else head_basis_kwargs,
                             bias=head_bias, norm=head_norm, act=head_act) if head else None

    def config(self) -> dict:
        return {"model": "convkan", "input_shape": list(self.input_shape), "n_outputs": self.n_outputs,
                "channels": self.channels, "kernel": self.kernel, "pool_every": self.pool_every,
                "strides": self.strides, "norm": self.norm, "basis": self.basis_name, "basis_kwargs": self.basis_kwargs,
                **self.options}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.reshape(x.shape[0], *self.input_shape)
        if self.head is None:
            return self.features(x)
        return self.head(self.features(x).mean(dim=(2, 3)))


def kan_layers(model: nn.Module) -> list[tuple[str, KANLayer]]:
    """Every KAN layer of a model with its qualified name, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, KANLayer)]


def layer_inputs(model: nn.Module, x: torch.Tensor, max_rows: int = 4096) -> list[torch.Tensor]:
    """The inputs every KAN layer sees on batch ``x`` (conv layers: patch rows, subsampled evenly
    to at most ``max_rows``)."""
    layers = kan_layers(model)
    conv_of = {id(m.kan): m for m in model.modules() if isinstance(m, KANConv2d)}
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for k, (_, layer) in enumerate(layers):
        if id(layer) in conv_of:  # the fast convolution never calls its inner layer: unfold its input
            hooks.append(conv_of[id(layer)].register_forward_hook(
                lambda m, args, out, k=k: seen.__setitem__(k, m.patches(args[0]).detach())))
        else:
            hooks.append(layer.register_forward_hook(
                lambda m, args, out, k=k: seen.__setitem__(k, args[0].detach())))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    res = []
    for k in range(len(layers)):
        r = seen[k]
        if r.shape[0] > max_rows:
            r = r[torch.linspace(0, r.shape[0] - 1, max_rows, device=r.device).long()]
        res.append(r)
    return res
