"""``quantize``: scalar quantisation of every edge tensor to b-bit integers plus counted scales.

Recipe (mechanisms in :mod:`bench.compression.quant`, :mod:`bench.compression.ptq`,
:mod:`bench.compression.mixed_precision`):

1. **Formats.** Groups sharing a scale: the whole ``layer``, each output ``node`` (default) or
   each ``edge``; scales stored as float32 or float16; symmetric (``int<b>`` codes) or
   asymmetric (``uint<b>`` codes plus a ``uint<b>`` zero point per group). With
   ``branch_aware`` the basis coefficients and the base-branch weight (the last entry of every
   edge vector) are two branches with their own scales and widths (``base_bits``; QuantKAN's
   branch-aware quantisers). Everything, the 4-bit width of every branch included, is counted.
2. **Mixed precision** (``avg_bits``): the width of every branch of every layer is chosen in
   ``2..bits`` so that the edge tensors store at most ``avg_bits`` bits per value on average
   (all overhead included), from each branch's measured output sensitivity per width on a
   calibration batch of training data (greedy allocation, :mod:`bench.compression.mixed_precision`).
3. **Grid.** Layer by layer, on the inputs the model with the earlier layers already quantised
   produces for a calibration batch of training data: with ``calibrate`` the clipping factor of
   each branch is grid-searched (per output node for node/edge scales) to minimise the layer's
   output MSE; the scales follow from the clipped range.
4. **Codes**, by ``algorithm``:

   - ``rtn``: round to nearest.
   - ``gptq``: GPTQ, column by column with error feedback through the inverse Hessian of the
     layer's features (act order, 1 % dampening).
   - ``adaround``: AdaRound, learned up/down rounding on the layer objective
     (``adaround_iters`` Adam steps on mini-batches of the calibration features).
   - ``ste``: QAT, fine-tuning the float weights through a straight-through estimator (scales
     follow the weights' range times the calibrated clip) with the shared fine-tune budget
     (``ctx.finetune``, best epoch on validation), then frozen to integers.
   - ``lsq``: QAT with LSQ: the step sizes, initialised from the calibrated grid, are trained
     with the weights (LSQ's gradient scale), same budget, then frozen.

   The frozen QAT model has exactly the forward that was validated. Post-training algorithms
   do no fine-tune.

No requested ratio except with ``avg_bits`` (``32 / avg_bits``); the nominal ratio, the
achieved ratios, the widths per layer and branch, and per PTQ layer the layer objective
(relative output MSE) of round to nearest and of the algorithm are in the row's ``info``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bench.compression.methods import Method, register_method
from bench.compression.mixed_precision import allocate_widths, output_sensitivity
from bench.compression.ptq import adaround_codes, gptq_codes, layer_hessian, layer_objective
from bench.compression.quant import (
    GRANULARITIES,
    LayerGrid,
    LSQSource,
    QFormat,
    QuantSource,
    branch_slices,
    search_clip,
)
from bench.compression.storage import storage_report
from bench.errors import UserError
from bench.model.kan import kan_layers, layer_inputs

ALGORITHMS = ("rtn", "gptq", "adaround", "ste", "lsq")
QAT = ("ste", "lsq")
MIN_BITS = 2


def _lsq_steps(layer) -> list[torch.Tensor]:
    return [m.step.detach() for m in layer.source.modules() if isinstance(m, LSQSource)]


def _replace_branch(layer, cut: slice, part: torch.Tensor, w: torch.Tensor):
    """For :func:`output_sensitivity`: put ``part`` into branch ``cut`` of a dense layer's weight;
    the returned function restores ``w``."""

    def apply():
        layer.source.weight[:, :, cut] = part
        return lambda: layer.source.weight.copy_(w)

    return apply


@register_method("quantize")
class Quantize(Method):
    """Scalar quantisation to b-bit integers + counted scales: RTN, GPTQ, AdaRound (PTQ), STE, LSQ (QAT)."""

    @dataclass
    class Config:
        bits: int = field(default=8, metadata={"min": MIN_BITS, "max": 8, "help": "bits per stored value "
                                               "(the basis coefficients' when branch_aware; the widest with avg_bits)"})
        algorithm: str = field(default="rtn", metadata={"choices": list(ALGORITHMS),
                                                        "help": "rtn, gptq, adaround: post-training; ste, lsq: QAT"})
        branch_aware: bool = field(default=False, metadata={"help": "separate scales and widths for the basis "
                                                                    "coefficients and the base-branch weight"})
        base_bits: int | None = field(default=None, metadata={"min": MIN_BITS, "max": 8, "help": "bits of the "
                                      "base-branch weights (branch_aware only); default (None) bits"})
        avg_bits: float | None = field(default=None, metadata={"min": 0.01, "max": 32, "help": "mixed precision: "
                                       "widths per layer (and branch) in 2..bits under this many stored bits per "
                                       "edge-tensor value; default (None) uniform widths"})
        granularity: str = field(default="node", metadata={"choices": list(GRANULARITIES),
                                                           "help": "values sharing one scale"})
        scale_dtype: str = field(default="float32", metadata={"choices": ["float32", "float16"]})
        symmetric: bool = field(default=True, metadata={"help": "false: asymmetric with b-bit zero points"})
        calibrate: bool = field(default=True, metadata={"help": "grid-search clipping on a calibration batch"})
        calib_samples: int = field(default=2048, metadata={"min": 8, "help": "training inputs for clipping, "
                                   "GPTQ's Hessian, AdaRound and the mixed-precision sensitivities"})
        adaround_iters: int = field(default=500, metadata={"min": 1, "help": "AdaRound optimisation steps per layer"})

        def validate(self):
            if self.base_bits is not None and not self.branch_aware:
                raise UserError("method 'quantize' option base_bits needs branch_aware = true")
            if self.base_bits is not None and self.avg_bits is not None:
                raise UserError("method 'quantize' options base_bits and avg_bits exclude each other: "
                                "mixed precision (avg_bits) chooses every width")

    grid = {"bits": [8, 4, 3, 2], "algorithm": list(ALGORITHMS)}
    test_config = {"bits": 4, "algorithm": "lsq", "branch_aware": True}

    def finetune_epochs(self, budget: int) -> int:
        return budget if self.config.algorithm in QAT else 0  # post-training algorithms do not fine-tune

    def fmt(self, bits: int) -> QFormat:
        c = self.config
        return QFormat(bits, c.granularity, c.symmetric, c.scale_dtype)

    def uniform_widths(self, layer) -> dict[str, int]:
        c = self.config
        return {name: (c.base_bits or c.bits) if name == "base" else c.bits
                for name, _ in branch_slices(layer.edge_dim, c.branch_aware)}

    def branches(self, layer, widths: dict[str, int]) -> list[tuple[str, slice, QFormat]]:
        return [(name, cut, self.fmt(widths[name]))
                for name, cut in branch_slices(layer.edge_dim, self.config.branch_aware)]

    @torch.no_grad()
    def choose_widths(self, model, x: torch.Tensor, details: dict) -> list[dict[str, int]]:
        """Mixed precision: per layer and branch, the width under the ``avg_bits`` budget from each
        branch's output sensitivity per width on the calibration batch ``x`` (training data)."""
        c = self.config
        layers = [layer for _, layer in kan_layers(model)]
        inputs = layer_inputs(model, x)
        costs, sens = {}, {}
        for k, (layer, xin) in enumerate(zip(layers, inputs)):
            feats, w = layer.features(xin), layer.edge_tensor().detach().clone()
            for name, cut in branch_slices(layer.edge_dim, c.branch_aware):
                unit = (k, name)
                costs[unit], sens[unit] = {}, {}
                for bits in range(MIN_BITS, c.bits + 1):
                    fmt = self.fmt(bits)
                    clip = search_clip(w, feats, cut, fmt) if c.calibrate else 1.0
                    src = QuantSource.from_float(w[:, :, cut], clip=clip, **fmt.kwargs())
                    costs[unit][bits] = sum(it.bits for it in src.storage())
                    sens[unit][bits] = output_sensitivity(model, x, _replace_branch(layer, cut, src.edge_tensor(), w))
        values = sum(layer.source.weight.numel() for layer in layers)
        budget = c.avg_bits * values
        pick = allocate_widths(costs, sens, budget)
        details.update(budget_bits=budget, sensitivity={f"{k}.{name}": s for (k, name), s in sens.items()})
        return [{name: pick[(k, name)] for name, _ in branch_slices(layer.edge_dim, c.branch_aware)}
                for k, layer in enumerate(layers)]

    def compress(self, model, ctx):
        c = self.config
        details = ctx.result.details
        details.update(algorithm=c.algorithm, branch_aware=c.branch_aware)
        if c.avg_bits is not None:  # mixed precision asks for a ratio: 32 bits / the average width
            ctx.result.requested_ratio = 32.0 / c.avg_bits
        layers = [layer for _, layer in kan_layers(model)]
        x = ctx.calibration_batch(c.calib_samples)
        widths = self.choose_widths(model, x, details) if c.avg_bits is not None else \
            [self.uniform_widths(layer) for layer in layers]
        clips, errors, lsq_init = [], {name: [] for name in ("rtn", c.algorithm)}, []
        for k, layer in enumerate(layers):
            with torch.no_grad():  # this layer's inputs, the earlier layers already quantised
                feats = layer.features(layer_inputs(model, x)[k])
            w = layer.edge_tensor().detach()
            grid = LayerGrid.calibrated(w, self.branches(layer, widths[k]), feats if c.calibrate else None)
            clips.append({name: float(torch.as_tensor(cl).float().mean())
                          for (name, _, _), cl in zip(grid.branches, grid.clips)})
            if c.algorithm == "ste":
                layer.set_source(grid.fake_quant_source(w))
                continue
            if c.algorithm == "lsq":
                layer.set_source(grid.lsq_source(w))
                lsq_init.append([s.clone() for s in _lsq_steps(layer)])
                continue
            out = w.shape[0]
            feats2d, w2d = feats.reshape(feats.shape[0], -1), w.reshape(out, -1)
            q = grid.round_to_nearest(w)
            if c.algorithm != "rtn":
                errors["rtn"].append(layer_objective(feats2d, w2d, grid.dequantize(q).reshape(out, -1)))
            flat = [t.reshape(out, -1) for t in grid.expand()]
            if c.algorithm == "gptq":
                q = gptq_codes(w2d, layer_hessian(feats2d), *flat).reshape(w.shape)
            elif c.algorithm == "adaround":
                q = adaround_codes(w2d, feats2d, *flat, iters=c.adaround_iters, seed=ctx.seed).reshape(w.shape)
            errors[c.algorithm].append(layer_objective(feats2d, w2d, grid.dequantize(q).reshape(out, -1)))
            layer.set_source(grid.source(q))
        if c.algorithm in QAT:
            ctx.finetune(model, desc=f"{c.algorithm} {c.bits}-bit")
            if c.algorithm == "lsq":
                details["lsq_step_change"] = [  # mean |s / s0 - 1| per layer and branch
                    [float((s / s0 - 1).abs().mean()) for s, s0 in zip(_lsq_steps(layer), init)]
                    for layer, init in zip(layers, lsq_init)]
            for layer in layers:
                layer.set_source(layer.source.freeze())
        else:
            details["layer_error"] = errors  # relative layer objective per layer: RTN and the algorithm
        rep = storage_report(model)
        n_values = sum(layer.edge_tensor().numel() for layer in layers)
        details.update(layer_bits=widths, mean_clip=clips, avg_bits=rep.coef_stored_bits / n_values,
                       nominal_value_ratio=32.0 * n_values / sum(
                           sum(w[name] * layer.edge_tensor()[:, :, cut].numel()
                               for name, cut in branch_slices(layer.edge_dim, c.branch_aware))
                           for w, layer in zip(widths, layers)),
                       achieved_coef_ratio=rep.coef_compression_ratio, achieved_model_ratio=rep.compression_ratio)
