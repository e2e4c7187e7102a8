import pytest
import torch
import torch.nn.functional as F

from bench.model.bases import BASES
from bench.model.kan import KAN, ConvKAN, KANConv2d, KANLayer, kan_layers
from bench.model.kinds import from_config
from bench.model.sources import DenseSource


def reference_layer(layer: KANLayer, x: torch.Tensor) -> torch.Tensor:
    """The KAN formula written edge by edge: y_o = b_o + sum_i [w_oin silu(x_i) + sum_k w_oik phi_k(x_i)]."""
    w = layer.edge_tensor()
    phi = layer.basis(x)
    out = torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype)
    for o in range(layer.out_features):
        for i in range(layer.in_features):
            out[:, o] += w[o, i, -1] * F.silu(x[:, i]) + (phi[:, i, :] * w[o, i, :-1]).sum(-1)
    return out + layer.bias


@pytest.mark.parametrize("basis", sorted(BASES))
def test_layer_matches_edge_by_edge_formula(basis):
    torch.manual_seed(0)
    layer = KANLayer(4, 3, basis)
    x = torch.randn(5, 4)
    assert torch.allclose(layer(x), reference_layer(layer, x), atol=1e-5)


@pytest.mark.parametrize("basis", sorted(BASES))
def test_gradients_tiny_double(basis):
    torch.manual_seed(0)
    layer = KANLayer(2, 2, basis).double()
    x = (torch.rand(3, 2, dtype=torch.double) * 1.6 - 0.8).requires_grad_()
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,), eps=1e-6, atol=1e-4)
    w = layer.source.weight
    assert torch.autograd.gradcheck(lambda ww: (layer.basis(x.detach()).reshape(3, -1) @ ww[..., :-1].reshape(2, -1).T),
                                    (w,), eps=1e-6, atol=1e-4)


def test_kan_shapes_and_edge_tensors():
    m = KAN([784, 64, 10], basis="rbf")
    assert m(torch.randn(3, 784)).shape == (3, 10)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    shapes = [layer.edge_tensor().shape for _, layer in kan_layers(m)]
    assert shapes == [(64, 784, 9), (10, 64, 9)]


def test_convkan_layer_matches_loop_reference():
    torch.manual_seed(0)
    conv = KANConv2d(2, 3, kernel=3, padding=1, basis="bspline")
    x = torch.randn(2, 2, 5, 4)
    y = conv(x)
    assert y.shape == (2, 3, 5, 4)
    xp = F.pad(x, (1, 1, 1, 1))
    ref = torch.zeros_like(y)
    for b in range(2):
        for r in range(5):
            for c in range(4):
                patch = xp[b, :, r:r + 3, c:c + 3].reshape(1, -1)  # channel-major, like unfold
                ref[b, :, r, c] = reference_layer(conv.kan, patch)[0]
    assert torch.allclose(y, ref, atol=1e-5)
    assert conv.kan.edge_tensor().shape == (3, 2 * 9, 9)


def test_convkan_model_28_and_32():
    m = ConvKAN((1, 28, 28), 10, channels=[4, 8], basis="rbf")
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    m = ConvKAN((3, 32, 32), 100, channels=[4, 8, 8], basis="gram")
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert [tuple(layer.edge_tensor().shape) for _, layer in kan_layers(m)][0] == (4, 27, 9)


def test_build_model_round_trips_config():
    for m in (KAN([5, 4, 2], "chebyshev", {"degree": 3}), ConvKAN((1, 8, 8), 3, channels=[2], basis="fourier")):
        m2 = from_config(m.config())
        m2.load_state_dict(m.state_dict())
        x = torch.randn(2, 1, 8, 8) if isinstance(m, ConvKAN) else torch.randn(2, 5)
        assert torch.equal(m(x), m2(x))


def test_swapping_source_changes_the_forward_without_touching_basis():
    torch.manual_seed(0)
    layer = KANLayer(3, 2, "bspline")
    x = torch.randn(4, 3)
    y0 = layer(x)
    new = DenseSource(2, 3, layer.edge_dim)
    with torch.no_grad():
        new.weight.copy_(layer.source.weight * 2)
    layer.set_source(new)
    assert torch.allclose(layer(x) - layer.bias, 2 * (y0 - layer.bias), atol=1e-5)
    with pytest.raises(ValueError):
        layer.set_source(DenseSource(3, 3, layer.edge_dim))


def test_training_reduces_loss():
    torch.manual_seed(0)
    m = KAN([2, 4, 1], "bspline")
    x = torch.rand(256, 2) * 2 - 1
    y = (x[:, :1] * x[:, 1:])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = F.mse_loss(m(x), y).item()
    for _ in range(200):
        opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def _sources():
    from bench.compression.codebook import cluster_model
    from bench.compression.quant import QuantSource

    def quant(model):
        for _, layer in kan_layers(model):
            layer.set_source(QuantSource.from_float(layer.edge_tensor().detach(), bits=4))

    return {"dense": lambda m: None, "codebook": lambda m: cluster_model(m, 4, "layer"), "quant": quant}


@pytest.mark.parametrize("source", ["dense", "codebook", "quant"])
@pytest.mark.parametrize("stride,padding,kernel", [(1, None, 3), (2, None, 3), (1, 0, 3), (2, 2, 5)])
@pytest.mark.parametrize("basis", sorted(BASES))
def test_fast_conv_equals_unfold_reference_values_and_gradients(basis, stride, padding, kernel, source):
    torch.manual_seed(0)
    kwargs = {"norm": False} if basis == "rbf" else {}
    dtype, tol = (torch.float32, 1e-5) if source == "quant" else (torch.float64, 1e-10)  # dequantises to float32
    conv = KANConv2d(3, 4, kernel, stride=stride, padding=padding, basis=basis, basis_kwargs=kwargs)
    _sources()[source](conv)
    conv = conv.to(dtype)
    assert conv.fast
    x = torch.randn(2, 3, 9, 8, dtype=dtype, requires_grad=True)
    fast = conv(x)
    ref = conv.forward_unfold(x)
    assert fast.shape == ref.shape and torch.allclose(fast, ref, atol=tol)
    g = torch.randn_like(ref)
    params = [p for p in conv.parameters() if p.requires_grad]
    grads_fast = torch.autograd.grad(fast, [x, *params], g)
    grads_ref = torch.autograd.grad(ref, [x, *params], g)
    for a, b in zip(grads_fast, grads_ref):
        assert torch.allclose(a, b, atol=10 * tol, rtol=1e-4)


def test_layernorm_rbf_conv_keeps_the_unfold_path():
    conv = KANConv2d(3, 4, 3, basis="rbf")  # 27 patch inputs: LayerNorm on, the basis mixes a patch
    assert not conv.fast
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(conv(x), conv.forward_unfold(x))


def test_layer_inputs_of_a_fast_conv_are_its_patch_rows():
    from bench.model.kan import layer_inputs

    torch.manual_seed(0)
    model = ConvKAN((1, 8, 8), 3, channels=[2], basis="bspline")
    x = torch.randn(2, 1, 8, 8)
    rows = layer_inputs(model, x, max_rows=1 << 30)
    conv = model.features[0]
    assert conv.fast and torch.equal(rows[0], conv.patches(x))
    assert rows[1].shape == (2, 2)  # the head sees the pooled channels


@pytest.mark.parametrize("norm", ["batch", "instance", "layer", "none"])
def test_convkan_norms_are_stored_counted_and_reload(tmp_path, norm):
    from bench.compression.storage import export_model, load_model, storage_report

    torch.manual_seed(0)
    m = ConvKAN((1, 8, 8), 4, channels=[16, 8], norm=norm, basis="rbf")
    m.train()
    m(torch.randn(8, 1, 8, 8))  # BatchNorm running statistics move
    items = dict(storage_report(m).items)
    norm_items = {k: it.bits for k, it in items.items() if k.startswith("features.1.")}
    expect = {"batch": {"features.1.weight": 16 * 32, "features.1.bias": 16 * 32, "features.1.running_mean": 16 * 32,
                        "features.1.running_var": 16 * 32},  # not num_batches_tracked: inference never reads it
              "instance": {"features.1.weight": 16 * 32, "features.1.bias": 16 * 32},
              "layer": {"features.1.weight": 16 * 32, "features.1.bias": 16 * 32},
              "none": {}}[norm]
    if norm == "none":  # features.1 is the second convolution
        assert not any(k.startswith("features.1.") and "source" not in k for k in items)
    else:
        assert norm_items == expect
    assert all(not conv.kan.basis.use_norm for conv in m.modules() if isinstance(conv, KANConv2d)) == (norm != "none")
    export_model(m, tmp_path / "m.kanb")
    again = load_model(tmp_path / "m.kanb")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(m.eval()(x), again(x), atol=1e-6)


def test_metakan8_convkan_shapes_and_option_errors():
    from bench.errors import UserError

    m = ConvKAN((1, 28, 28), 10, channels=[16, 32, 64, 128, 256, 256, 512, 512], strides=[1, 2, 2, 1, 1, 2, 1, 1],
                pool_every=0, norm="batch", basis="gram")
    sizes, x = [], torch.randn(2, 1, 28, 28)
    for block in m.features:
        x = block(x)
        if isinstance(block, KANConv2d):
            sizes.append(x.shape[-1])
    assert sizes == [28, 14, 7, 7, 7, 4, 4, 4] and m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert not any(isinstance(b, torch.nn.MaxPool2d) for b in m.features)
    with pytest.raises(UserError, match="norm"):
        ConvKAN((1, 8, 8), 4, channels=[4], norm="group")
    with pytest.raises(UserError, match="strides"):
        ConvKAN((1, 8, 8), 4, channels=[4, 4], strides=[1])


@pytest.mark.parametrize("out", [20, 5])
def test_dense_edge_tensor_is_laid_out_as_the_product_reads_it(tmp_path, out):
    """A dense source keeps the canonical [out, in, n+1] shape and values over the memory of its product
    matrix ([n+1, in, out] for a wide layer, [out, n+1, in] for a narrow one): under autograd that matrix is
    the parameter itself (no copy a step), row-major or column-major as WIDE_OUT says, its gradient lands in
    the parameter in that layout, and saving, loading and copying keep the values (and the layout)."""
    import copy

    torch.manual_seed(0)
    layer = KANLayer(7, out, "bspline")
    w = layer.source.weight
    wide = out >= DenseSource.WIDE_OUT
    memory = w.permute(2, 1, 0) if wide else w.transpose(1, 2)
    assert w.shape == (out, 7, 9) and memory.is_contiguous()
    m = layer.source.product_matrix(True)
    assert m.shape == (9 * 7, out) and m.data_ptr() == w.data_ptr()  # under grad: a view, not a copy
    assert m.is_contiguous() == wide and m.t().is_contiguous() != wide
    x = torch.randn(6, 7)
    ref = torch.einsum("bie,oie->bo", layer.basis.features(x), w.detach().contiguous()) + layer.bias
    y = layer(x)
    assert torch.allclose(y, ref, atol=1e-5)
    y.square().sum().backward()
    assert w.grad.shape == w.shape and w.grad.stride() == w.stride()
    # the same init draws as a contiguous [out, in, n+1] tensor (seeded runs reproduce earlier results)
    torch.manual_seed(1)
    a = DenseSource(out, 7, 9, init=lambda t: t.normal_())
    torch.manual_seed(1)
    assert torch.equal(a.weight, torch.empty(out, 7, 9).normal_())
    torch.save(layer.state_dict(), tmp_path / "l.pt")
    other = KANLayer(7, out, "bspline")
    other.load_state_dict(torch.load(tmp_path / "l.pt"))
    for mod in (other, copy.deepcopy(layer)):
        assert torch.equal(mod.source.weight, w) and mod.source.weight.stride() == w.stride()
