"""``quantize``: scalar quantisation of every edge tensor to ``bits``-bit integers plus scales.

Recipe (mechanisms in :mod:`bench.quant`):

- Groups sharing a scale: the whole ``layer``, each output ``node`` (default) or each ``edge``;
  scales stored as float32 or float16; symmetric (``int<b>`` codes) or asymmetric (``uint<b>`` codes
  plus a ``uint<b>`` zero point per group). Everything is counted at its stored width.
- ``ptq``: round to nearest. With ``calibrate`` the clipping factor is grid-searched per layer
  (per output node for node/edge scales) to minimise the layer's output MSE against the float
  layer on a calibration batch of training data (inputs from the float model).
- ``qat``: fine-tune through a straight-through estimator with the shared fine-tune budget
  (``ctx.finetune``, best epoch on validation), then freeze to integers: the frozen model has
  exactly the forward that was validated.

No requested ratio: the ratio follows from ``bits`` and the scale overhead; the nominal value
ratio ``32 / bits`` and the achieved ratios are recorded in the result's ``details``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bench.kan import kan_layers, layer_inputs
from bench.methods import Method, register_method
from bench.quant import GRANULARITIES, FakeQuantSource, QuantSource, fake_quantize
from bench.storage import storage_report

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3)


@register_method("quantize")
class Quantize(Method):
    """Scalar quantisation to b-bit integers + counted per-layer/node/edge scales (PTQ or STE QAT)."""

    @dataclass
    class Config:
        bits: int = field(default=8, metadata={"min": 2, "max": 8, "help": "bits per stored coefficient"})
        granularity: str = field(default="node", metadata={"choices": list(GRANULARITIES),
                                                           "help": "values sharing one scale"})
        scale_dtype: str = field(default="float32", metadata={"choices": ["float32", "float16"]})
        symmetric: bool = field(default=True, metadata={"help": "false: asymmetric with b-bit zero points"})
        mode: str = field(default="ptq", metadata={"choices": ["ptq", "qat"]})
        calibrate: bool = field(default=True, metadata={"help": "grid-search clipping on a calibration batch"})
        calib_samples: int = field(default=512, metadata={"min": 8})

    grid = {"bits": [8, 6, 4, 3, 2], "mode": ["ptq", "qat"]}
    test_config = {"bits": 4, "mode": "qat"}

    def _settings(self) -> dict:
        c = self.config
        return {"bits": c.bits, "granularity": c.granularity, "symmetric": c.symmetric, "scale_dtype": c.scale_dtype}

    @torch.no_grad()
    def calibrate_clips(self, model, x: torch.Tensor) -> list[torch.Tensor]:
        """Per layer: the clip factor (scalar for layer scales, else one per output node) from
        :data:`CLIP_GRID` minimising the layer's output MSE on ``x``."""
        clips = []
        for (_, layer), xin in zip(kan_layers(model), layer_inputs(model, x)):
            feats = layer.features(xin).reshape(xin.shape[0], -1)
            w = layer.edge_tensor().detach()
            y = feats @ w.reshape(w.shape[0], -1).t()
            errs = []
            for c in CLIP_GRID:
                wq = fake_quantize(w, clip=c, **self._settings())
                errs.append(((feats @ wq.reshape(w.shape[0], -1).t() - y) ** 2).mean(0))  # [out]
            errs = torch.stack(errs)  # [n_clips, out]
            grid = torch.tensor(CLIP_GRID, device=w.device)
            if self.config.granularity == "layer":
                clips.append(grid[errs.sum(1).argmin()])
            else:
                clips.append(grid[errs.argmin(0)])
        return clips

    def compress(self, model, ctx):
        cfg = self.config
        layers = [layer for _, layer in kan_layers(model)]
        clips = [torch.tensor(1.0)] * len(layers)
        if cfg.calibrate:
            clips = self.calibrate_clips(model, ctx.calibration_batch(cfg.calib_samples))
        if cfg.mode == "ptq":
            for layer, clip in zip(layers, clips):
                layer.set_source(QuantSource.from_float(layer.edge_tensor().detach(), clip=clip, **self._settings()))
        else:
            for layer, clip in zip(layers, clips):
                w = layer.edge_tensor().detach()
                layer.set_source(FakeQuantSource(w, clip=clip, **self._settings()).to(w.device))
            ctx.finetune(model, desc=f"qat {cfg.bits}-bit")
            for layer in layers:
                layer.set_source(layer.source.freeze())
        rep = storage_report(model)
        ctx.result.details.update(nominal_value_ratio=32.0 / cfg.bits, achieved_coef_ratio=rep.coef_compression_ratio,
                        achieved_model_ratio=rep.compression_ratio,
                        mean_clip=[float(torch.as_tensor(c).float().mean()) for c in clips])
