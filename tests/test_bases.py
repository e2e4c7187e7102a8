import math

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


@pytest.mark.parametrize("name,kwargs", [("bspline", {}), ("rbf", {"norm": False}), ("rbf", {}), ("chebyshev", {}),
                                         ("gram", {}), ("fourier", {}), ("bspline", {"grid": 3, "lo": -1.0}),
                                         ("bspline", {"extrapolate": True})])
def test_kernel_expression_matches_the_basis_values_and_gradients(name, kwargs):
    """What the fused features compile is the basis (values, then silu) in values and gradients,
    the RBF's LayerNorm parameters included."""
    b = make_basis(name, 5, **kwargs).double()
    fn, args = b.kernel()
    x = (3 * torch.randn(64, 5, dtype=torch.float64)).requires_grad_()
    g = torch.randn(64, 5, b.n_basis + 1, dtype=torch.float64)
    wrt = [x, *b.parameters()]
    want = torch.cat([b(x), torch.nn.functional.silu(x).unsqueeze(-1)], dim=-1)
    got = fn(x, *args).transpose(1, 2)  # basis-major underneath
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(b.features(x), want, atol=1e-12)  # the eager features: one tensor, same values
    for a, r in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g)):
        assert torch.allclose(a, r, atol=1e-6)


def test_bases_without_a_kernel_run_eagerly():
    assert make_basis("bspline", 4, order=2).kernel() is None  # only the cubic has a closed form here
    assert make_basis("bspline", 4, knots="per_input").kernel() is None  # knots are data: the recursion
    assert make_basis("kagn", 4).kernel() is None  # learned recurrence coefficients


def _reference(b, x):
    """Each basis from its definition, independently of the code under test, in float64."""
    import math

    if b.name == "bspline":
        from bench.model.bases import cox_de_boor
        xc = x if b.extrapolate else x.clamp(b.lo, b.hi - 1e-6 * (b.hi - b.lo))
        return cox_de_boor(xc, b.knots.double(), b.order)
    if b.name == "rbf":
        centers = torch.linspace(b.lo, b.hi, b.n_basis, dtype=x.dtype)
        return torch.exp(-(((b.norm(x).unsqueeze(-1) - centers) / ((b.hi - b.lo) / (b.n_basis - 1))) ** 2))
    t = torch.tanh(x)
    if b.name == "chebyshev":  # T_k(t) = cos(k acos t)
        t = t.clamp(-1 + b.margin, 1 - b.margin)
        return torch.cos(torch.arange(b.n_basis, dtype=x.dtype) * torch.acos(t).unsqueeze(-1))
    if b.name == "gram":  # monic orthogonal on m points (2k - m + 1) / m: Gram-Schmidt of 1, t, t^2, ... there
        t = t.clamp(-1 + b.margin, 1 - b.margin)
        m = b.n_basis
        pts = (2 * torch.arange(m, dtype=x.dtype) - (m - 1)) / m
        q = []
        for k in range(m):
            coef = torch.zeros(m, dtype=x.dtype)
            coef[k] = 1.0
            for qc in q:  # subtract projections (discrete inner product on the points)
                pv, qv = _poly(coef, pts), _poly(qc, pts)
                coef = coef - (pv * qv).sum() / (qv * qv).sum() * qc
            q.append(coef)
        return torch.stack([_poly(c, t) for c in q], dim=-1)
    if b.name == "fourier":
        a = (math.pi * t).unsqueeze(-1) * torch.arange(1, b.frequencies + 1, dtype=x.dtype)
        return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
    raise AssertionError(b.name)


def _poly(coef, t):
    return sum(c * t**k for k, c in enumerate(coef))


@pytest.mark.parametrize("name,kwargs", [("bspline", {}), ("bspline", {"extrapolate": True}),
                                         ("bspline", {"order": 2}), ("rbf", {}), ("rbf", {"norm": False}),
                                         ("chebyshev", {}), ("gram", {}), ("fourier", {})])
def test_features_far_outside_the_grid_are_finite_and_exact(name, kwargs):
    """Speed must not cost exactness: at +-1e3 (and in between) the features, eager and compiled
    expression alike, are finite and equal the basis's definition in float64 to 1e-6 (flashkan's
    truncated-power form gives 8.0 for a value that is 0 at x = 200)."""
    from bench.model.bases import features_path

    b = make_basis(name, 6, **kwargs).double()
    x = torch.tensor([[-1e3, -200.0, -3.0, -0.3, 0.7, 1e3], [1e3, 200.0, 2.5, -2.0, 2.0, -1e3]], dtype=torch.float64)
    want = torch.cat([_reference(b, x), torch.nn.functional.silu(x).unsqueeze(-1)], dim=-1)
    paths = {"eager": b.features(x)}
    if b.kernel() is not None:
        fn, args = b.kernel()
        paths["expression"] = fn(x, *args).transpose(1, 2)
    for path, got in paths.items():
        assert torch.isfinite(got).all(), path
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (path, (got - want).abs().max())
    assert features_path() in ("compiled", "eager")
def test_fused_features_give_the_eager_convkan_outputs_and_gradients():
    """By default a ConvKAN's step runs the compiled features, and matches the eager step."""
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

    use_fused_features(False)
    try:
        y_eager, g_eager = step()
    finally:
        use_fused_features(None)
    y_fused, g_fused = step()  # the default
    assert _FUSED["compiled"], "the compiled path was not taken"
    assert torch.allclose(y_fused, y_eager, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g_fused, g_eager))


def test_compiled_features_are_the_default_and_a_compiler_failure_falls_back_in_one_line(monkeypatch, capsys):
    """Library use gets the compiled features without asking (basis-major underneath, equal to eager);
    BENCH_EAGER=1 asks for eager; a compiler that fails is said once and every layer runs eagerly."""
    from bench.model import bases
    from bench.model.kan import KAN

    torch.manual_seed(0)
    model, x = KAN([6, 5, 3], "gram"), torch.randn(16, 6)
    feats = model.layers[0].features(x)
    assert bases.features_path() == "compiled" and bases.basis_major(feats)
    eager = model.layers[0].basis.features(x)
    assert not bases.basis_major(eager) and torch.allclose(feats, eager, atol=1e-6)
    y = model(x)
    monkeypatch.setenv("BENCH_EAGER", "1")
    assert bases.features_path() == "eager" and not bases.basis_major(model.layers[0].features(x))
    assert torch.allclose(model(x), y, atol=1e-5)
    monkeypatch.delenv("BENCH_EAGER")

    def broken(fn, **options):
        def call(*args):
            raise RuntimeError("no C compiler found\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setitem(bases._FUSED, "compiled", {})
    try:
        assert torch.allclose(model(x), y, atol=1e-5)
        assert torch.allclose(model(x), y, atol=1e-5)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert "compiled KAN kernels unavailable (RuntimeError: no C compiler found, compiling " in err[0]
        assert bases.features_path() == "eager"
    finally:
        bases._FUSED["failed"] = None


def test_compiled_features_run_on_every_thread_whatever_size_compiled_them_first(monkeypatch):
    """Inductor picks a CPU loop's threading from the first call's sizes and caches that choice on disk
    for every later process: a tiny first layer left every layer after it single-threaded. The compiled
    features ask for run-time threading (``cpp.dynamic_threads``), whatever the first call."""
    from bench.model import bases
    from bench.model.kan import KANLayer

    seen = []
    real = torch.compile

    def record(fn, **options):
        seen.append(options.get("options") or {})
        return real(fn, **options)

    monkeypatch.setattr(torch, "compile", record)
    monkeypatch.setitem(bases._FUSED, "compiled", {})
    layer = KANLayer(2, 3, "chebyshev")
    with torch.no_grad():
        feats = layer.features(torch.randn(4, 2))
    assert bases.basis_major(feats), "the compiled path ran"
    assert seen and all(o.get("cpp.dynamic_threads") is True for o in seen)


def test_fourier_angle_addition_is_as_exact_in_float32_as_a_cosine_per_frequency():
    """The Fourier features take one cosine and one sine, then angle addition up to the highest frequency;
    in float32 that must stay as close to the float64 values as evaluating cos(k a) and sin(k a) directly."""
    b = make_basis("fourier", 2, frequencies=16)
    x = torch.cat([torch.linspace(-6.0, 6.0, 4001), torch.tensor([-1e3, 1e3, 0.0, 1e-6, -3e-4])])
    x = torch.stack([x, -0.5 * x], dim=1)  # [B, 2]
    k = torch.arange(1, 17, dtype=torch.float64)
    a = (math.pi * torch.tanh(x.double())).unsqueeze(-1) * k
    truth = torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
    a32 = (math.pi * torch.tanh(x)).unsqueeze(-1) * k.float()
    direct = torch.cat([torch.cos(a32), torch.sin(a32)], dim=-1)
    ours = (b(x).double() - truth).abs().max().item()
    theirs = (direct.double() - truth).abs().max().item()
    assert ours < 5e-6 and ours <= 1.5 * theirs + 1e-6, (ours, theirs)
