import pytest
import torch

from bench.errors import UserError
from bench.model.bases import BASES, make_basis


@pytest.mark.parametrize("name", sorted(BASES))
def test_shape_and_default_size(name):
    b = make_basis(name, 5)
    out = b(torch.randn(7, 5))
    assert out.shape == (7, 5, b.n_basis)
    assert b.n_basis == 8  # every default basis has 8 functions: edge vectors are comparable


def test_bspline_partition_of_unity_inside_and_at_edges():
    b = make_basis("bspline", 3, grid=5, order=3, lo=-2.0, hi=2.0)
    x = torch.cat([torch.linspace(-2, 2, 401), torch.tensor([-2.0, 2.0, -50.0, 50.0])]).reshape(-1, 1).repeat(1, 3)
    phi = b(x)
    assert torch.allclose(phi.sum(-1), torch.ones(x.shape), atol=1e-5)
    assert (phi >= -1e-7).all()
    # local support: a cubic B-spline is non-zero on at most order + 1 = 4 functions at once
    assert ((phi > 1e-7).sum(-1) <= 4).all()


def test_bspline_matches_scipy_style_reference():
    # Order-1 (hat) splines on a uniform grid have a closed form.
    b = make_basis("bspline", 1, grid=4, order=1, lo=0.0, hi=4.0)
    x = torch.tensor([[0.5], [1.0], [2.25]])
    phi = b(x)[:, 0]
    # knots at -1,0,1,2,3,4,5; hat j peaks at knot j+1
    expected = torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 0.75, 0.25, 0]])
    assert torch.allclose(phi, expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(BASES))
def test_no_nan_at_edges_values_and_gradients(name):
    b = make_basis(name, 4)
    x = torch.tensor([[-1.0, 1.0, -1e4, 1e4], [0.0, 2.0, -2.0, 1e-8]], requires_grad=True)
    out = b(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_chebyshev_is_chebyshev():
    b = make_basis("chebyshev", 1, degree=4)
    x = torch.tensor([[0.3]])
    t = torch.tanh(x)
    phi = b(x)[0, 0]
    assert torch.allclose(phi[4], 8 * t**4 - 8 * t**2 + 1, atol=1e-6)


def test_gram_polynomials_are_orthogonal_on_their_points():
    degree = 5
    b = make_basis("gram", 1, degree=degree)
    m = degree + 1
    pts = torch.tensor([-1 + (2 * i + 1) / m for i in range(m)])  # tanh^-1 so that tanh(x) = pts
    x = torch.atanh(pts).reshape(-1, 1)
    phi = b(x)[:, 0, :]  # [m, degree+1]
    gram = phi.T @ phi
    off = gram - torch.diag(torch.diag(gram))
    assert off.abs().max() < 1e-4


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="unknown basis"):
        make_basis("nope", 3)
    with pytest.raises(UserError, match="grid"):
        make_basis("bspline", 3, grid=0)
    with pytest.raises(UserError, match="bad option"):
        make_basis("rbf", 3, colour=1)


@pytest.mark.parametrize("grid,lo,hi", [(5, -2.0, 2.0), (3, -1.0, 1.0), (8, 0.0, 4.0)])
def test_cubic_fast_path_matches_recursion_values_and_gradients(grid, lo, hi):
    b = make_basis("bspline", 6, grid=grid, order=3, lo=lo, hi=hi).double()
    x = (torch.rand(9, 6, dtype=torch.double) * (hi - lo) * 1.4 + lo - 0.2 * (hi - lo)).requires_grad_()
    fast, ref = b(x), b.reference(x)
    assert torch.allclose(fast, ref, atol=1e-6)
    g = torch.randn_like(fast)
    (gf,) = torch.autograd.grad(fast, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gf, gr, atol=1e-5)
    inside = x.detach()[(x.detach() > lo + 1e-3) & (x.detach() < hi - 1e-3)][:4].reshape(2, 2).clone()
    small = make_basis("bspline", 2, grid=grid, order=3, lo=lo, hi=hi).double()
    assert torch.autograd.gradcheck(small, (inside.requires_grad_(),), eps=1e-6, atol=1e-5)


def test_rbf_fast_path_matches_reference_values_and_gradients():
    b = make_basis("rbf", 6).double()
    x = torch.randn(7, 6, dtype=torch.double, requires_grad=True)
    assert torch.allclose(b(x), b.reference(x))
    g = torch.randn(7, 6, 8, dtype=torch.double)
    fast = torch.autograd.grad(b(x), [x, *b.norm.parameters()], g)
    ref = torch.autograd.grad(b.reference(x), [x, *b.norm.parameters()], g)
    assert all(torch.allclose(a, r) for a, r in zip(fast, ref))
    assert torch.autograd.gradcheck(b, (x[:2, :].detach().clone().requires_grad_(),))


@pytest.mark.parametrize("name,kwargs", [("bspline", {}), ("rbf", {"norm": False}), ("chebyshev", {}),
                                         ("gram", {}), ("fourier", {}), ("bspline", {"grid": 3, "lo": -1.0})])
def test_kernel_expression_matches_the_basis_values_and_gradients(name, kwargs):
    """What the fused features compile is the basis (values, then silu) in values and gradients."""
    b = make_basis(name, 5, **kwargs)
    fn, args = b.kernel()
    x = (3 * torch.randn(64, 5, dtype=torch.float64)).requires_grad_()
    g = torch.randn(64, 5, b.n_basis + 1, dtype=torch.float64)
    want = torch.cat([b(x), torch.nn.functional.silu(x).unsqueeze(-1)], dim=-1)
    got = fn(x, *args)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0], atol=1e-6)


def test_bases_without_a_pointwise_kernel_run_eagerly():
    assert make_basis("rbf", 8).kernel() is None  # LayerNorm mixes a row's inputs
    assert make_basis("bspline", 4, order=2).kernel() is None  # only the cubic has a closed form here


def test_fused_features_give_the_eager_convkan_outputs_and_gradients():
    """With train.compile on, a ConvKAN's step runs the compiled features and matches eager."""
    from bench.model.bases import _FUSED, use_fused_features
    from bench.model.kan import ConvKAN

    torch.manual_seed(0)
    model = ConvKAN((1, 12, 12), 3, [4, 6], 3, 1, "bspline")
    x = torch.randn(8, 1, 12, 12)

    def step():
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters()]

    y_eager, g_eager = step()
    use_fused_features(True)
    try:
        y_fused, g_fused = step()
    finally:
        use_fused_features(False)
    assert _FUSED["compiled"], "the compiled path was not taken"
    assert torch.allclose(y_fused, y_eager, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g_fused, g_eager))
