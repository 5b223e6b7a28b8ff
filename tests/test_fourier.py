"""Property tests for `niff_nb.fourier`: transforms against `torch.fft`, the convolution theorem on many
shapes, the cost model, and bad input. The tutorial checks live in `nbs/00_fourier.ipynb`."""
import math

import pytest
import torch
import torch.nn.functional as F

from niff_nb.fourier import (ConvTiming, circular_conv1d, circular_conv2d_direct, circular_flip,
                             conv2d_circular_spatial, conv_cost_fft, conv_cost_spatial, dft, dft2, dft_matrix,
                             fft_conv1d, fft_conv2d, fft_radix2, idft, time_conv)

REAL = (torch.float32, torch.float64)
COMPLEX = (torch.complex64, torch.complex128)
ALL = REAL + COMPLEX
DTYPE_ID = lambda d: str(d).removeprefix("torch.")
COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128,
              torch.complex64: torch.complex64, torch.complex128: torch.complex128}


def rand(*shape, dtype=torch.float64, seed=0):
    "Seeded standard-normal tensor of `shape` and `dtype`."
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def eps_of(dtype):
    "Machine epsilon of the real precision a real or complex `dtype` computes in."
    return torch.finfo(torch.float32 if dtype in (torch.float32, torch.complex64) else torch.float64).eps


def tol(dtype, n=1):
    """Bound on max |error| / max |reference| for a transform or convolution in `dtype` that sums `n` terms per output.
    A sum of n rounded terms is off by at most about n * eps of their size (Higham's gamma_n); the factor 8 covers
    the reference's own rounding and leaves a margin (measured over this file: at most 0.7 * n * eps)."""
    return 8 * max(n, 1) * eps_of(dtype)


def assert_close(a, b, dtype, n=1):
    "`a` equals the reference `b` up to float rounding: same shape, max |a - b| <= tol(dtype, n) * max |b|."
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if b.numel() == 0: return
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol(dtype, n) * scale, f"max |a - b| = {err:.3g} > {tol(dtype, n):.3g} * max |b| = {tol(dtype, n) * scale:.3g}"


# ---------------------------------------------------------------- DFT

@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_ID)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 17, 31, 64, 100, 128])
def test_dft_matches_torch(n, dtype):
    x = rand(3, n, dtype=dtype, seed=n)
    X = dft(x)
    assert X.dtype == torch.fft.fft(x).dtype == COMPLEX_OF[dtype]
    assert_close(X, torch.fft.fft(x), dtype, n)
    assert_close(idft(X), x.to(COMPLEX_OF[dtype]), dtype, n)
    assert_close(idft(x), torch.fft.ifft(x), dtype, n)


@pytest.mark.parametrize("shape,dim", [((7,), 0), ((2, 3, 5), 0), ((2, 3, 5), 1), ((2, 3, 5), -1),
                                       ((4, 1, 6, 2), -2), ((1, 1), 1)])
def test_dft_any_dim_and_leading_dims(shape, dim):
    x = rand(*shape, dtype=torch.complex128, seed=len(shape))
    assert_close(dft(x, dim=dim), torch.fft.fft(x, dim=dim), torch.float64, shape[dim])
    assert_close(idft(dft(x, dim=dim), dim=dim), x, torch.float64, shape[dim])


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_dft_matrix_is_symmetric_and_inverts(n):
    W = dft_matrix(n)
    assert W.shape == (n, n) and W.dtype == torch.complex128
    torch.testing.assert_close(W, W.T)
    torch.testing.assert_close(W @ W.conj().T, n * torch.eye(n, dtype=torch.complex128), atol=1e-12, rtol=0)
    assert dft_matrix(n, dtype=torch.complex64).dtype == torch.complex64


@pytest.mark.parametrize("bad", [0, -3])
def test_dft_matrix_bad_n_value(bad):
    with pytest.raises(ValueError, match="`n` must be a positive int"):
        dft_matrix(bad)


@pytest.mark.parametrize("bad", [2.0, True, "4"])
def test_dft_matrix_bad_n_type(bad):
    with pytest.raises(TypeError, match="`n` must be a positive int"):
        dft_matrix(bad)


def test_dft_matrix_bad_dtype():
    with pytest.raises(TypeError, match="`dtype` must be torch.complex64 or torch.complex128"):
        dft_matrix(4, dtype=torch.float64)


@pytest.mark.parametrize("fn", [dft, idft, fft_radix2, dft2])
def test_transforms_reject_non_tensors_and_int_dtypes(fn):
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fn([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(TypeError, match="must have a floating dtype .* got torch.int64"):
        fn(torch.arange(4).reshape(2, 2))


@pytest.mark.parametrize("dim", [2, -3, 1.0, True])
def test_dft_bad_dim(dim):
    with pytest.raises(ValueError, match=r"`dim` must be an int in \[-2, 1\]"):
        dft(rand(3, 4), dim=dim)


def test_dft_rejects_scalar():
    with pytest.raises(ValueError, match="`x` must have at least 1 dimension"):
        dft(torch.tensor(1.0))


# ---------------------------------------------------------------- radix-2 FFT

@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_ID)
@pytest.mark.parametrize("p", range(0, 13))
def test_fft_radix2_matches_torch(p, dtype):
    n = 2 ** p
    x = rand(2, n, dtype=dtype, seed=p)
    X = fft_radix2(x)
    assert X.dtype == COMPLEX_OF[dtype] and X.shape == x.shape
    assert_close(X, torch.fft.fft(x), dtype, n)


@pytest.mark.parametrize("shape", [(8,), (1, 8), (2, 3, 16), (2, 1, 3, 32)])
def test_fft_radix2_batched(shape):
    x = rand(*shape, dtype=torch.complex128, seed=1)
    assert_close(fft_radix2(x), torch.fft.fft(x), torch.float64, shape[-1])


def test_fft_radix2_matches_dft():
    x = rand(4, 64, dtype=torch.float64, seed=2)
    assert_close(fft_radix2(x), dft(x), torch.float64, 64)


@pytest.mark.parametrize("n", [0, 3, 6, 12, 100, 1000])
def test_fft_radix2_rejects_non_power_of_two(n):
    with pytest.raises(ValueError, match=rf"`x` must have a last dimension that is a power of two .* got {n}"):
        fft_radix2(torch.zeros(2, n))


# ---------------------------------------------------------------- 2-D and the real FFT

@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_ID)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (3, 4), (8, 8), (9, 6), (2, 3, 9, 6)])
def test_dft2_matches_fft2(shape, dtype):
    x = rand(*shape, dtype=dtype, seed=sum(shape))
    n = shape[-1] * shape[-2]
    assert_close(dft2(x), torch.fft.fft2(x), dtype, n)


def test_dft2_needs_two_dims():
    with pytest.raises(ValueError, match="`x` must have at least 2 dimension"):
        dft2(torch.zeros(4))


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (4, 4), (5, 8), (7, 9), (2, 3, 6, 5)])
def test_real_spectrum_is_hermitian_and_rfft2_keeps_half(shape):
    x = rand(*shape, seed=3)
    X = torch.fft.fft2(x)
    torch.testing.assert_close(circular_flip(X, dims=(-2, -1)), X.conj(), atol=1e-12, rtol=0)
    R = torch.fft.rfft2(x)
    W = shape[-1]
    assert R.shape[-1] == W // 2 + 1
    torch.testing.assert_close(R, X[..., : W // 2 + 1])
    torch.testing.assert_close(torch.fft.irfft2(R, s=shape[-2:]), x)


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_circular_flip(n):
    x = torch.arange(n)
    torch.testing.assert_close(circular_flip(x), x[(-x) % n])
    torch.testing.assert_close(circular_flip(circular_flip(x)), x)
    m = torch.arange(n * 3).reshape(n, 3)
    torch.testing.assert_close(circular_flip(m, dims=(0, 1)), circular_flip(circular_flip(m, 0), 1))


def test_circular_flip_bad_input():
    with pytest.raises(ValueError, match="`dims` entries must be in"):
        circular_flip(torch.zeros(3, 3), dims=(0, 2))
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        circular_flip([1, 2, 3])


# ---------------------------------------------------------------- convolution theorem

def direct_conv1d_loop(x, k):
    "Reference written independently of the library: explicit Python loops, 1-D, no batch."
    n = len(x)
    return torch.stack([sum(k[m] * x[(i - m) % n] for m in range(n)) for i in range(n)])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8])
def test_circular_conv1d_matches_loop_definition(n):
    x, k = rand(n, seed=n), rand(n, seed=n + 100)
    assert_close(circular_conv1d(x, k), direct_conv1d_loop(x, k), torch.float64, n)


@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_ID)
@pytest.mark.parametrize("lead,klead", [((), ()), ((3,), ()), ((3,), (3,)), ((2, 3), (3,)), ((2, 3), (2, 3))])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 15, 16])
def test_convolution_theorem_1d(n, lead, klead, dtype):
    x = rand(*lead, n, dtype=dtype, seed=n)
    k = rand(*klead, n, dtype=dtype, seed=n + 1)
    y = circular_conv1d(x, k)
    assert y.shape == x.shape and y.dtype == dtype
    y_fft = fft_conv1d(x, k)
    assert y_fft.dtype == dtype
    assert_close(y_fft, y, dtype, n)
    assert_close(dft(y), dft(k) * dft(x), dtype, n * n)


@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_ID)
@pytest.mark.parametrize("lead,klead", [((), ()), ((2,), ()), ((2, 3), (3,)), ((2, 3), (2, 3))])
@pytest.mark.parametrize("hw", [(1, 1), (1, 5), (4, 1), (3, 3), (4, 6), (7, 5), (8, 8)])
def test_convolution_theorem_2d(hw, lead, klead, dtype):
    x = rand(*lead, *hw, dtype=dtype, seed=sum(hw))
    k = rand(*klead, *hw, dtype=dtype, seed=sum(hw) + 1)
    y = circular_conv2d_direct(x, k)
    assert y.shape == x.shape and y.dtype == dtype
    y_fft = fft_conv2d(x, k)
    assert y_fft.dtype == dtype
    n = hw[0] * hw[1]
    assert_close(y_fft, y, dtype, n)
    assert_close(dft2(y), dft2(k) * dft2(x), dtype, n * n)


def test_convolution_theorem_2d_float64_precision():
    x, k = rand(4, 11, 6, seed=7), rand(11, 6, seed=8)
    torch.testing.assert_close(fft_conv2d(x, k), circular_conv2d_direct(x, k), atol=1e-10, rtol=0)


def test_conv_mixed_dtypes_promote():
    x, k = rand(8, dtype=torch.float32), rand(8, dtype=torch.float64, seed=1)
    assert circular_conv1d(x, k).dtype == torch.float64
    assert fft_conv1d(x, k).dtype == torch.float64
    z = rand(3, 4, dtype=torch.complex64)
    assert fft_conv2d(rand(3, 4, dtype=torch.float32), z).dtype == torch.complex64


def test_impulse_kernel_shifts():
    x = rand(5, 7, seed=9)
    k = torch.zeros(5, 7, dtype=torch.float64)
    k[2, 6] = 1  # shift down by 2 and by 6 == left by 1
    torch.testing.assert_close(fft_conv2d(x, k), torch.roll(x, (2, -1), dims=(0, 1)))
    torch.testing.assert_close(circular_conv2d_direct(x, k), torch.roll(x, (2, 6), dims=(0, 1)))


@pytest.mark.parametrize("fn", [circular_conv1d, fft_conv1d])
@pytest.mark.parametrize("xs,ks", [((8,), (7,)), ((2, 8), (3, 8)), ((8,), (2, 8)), ((2, 3, 8), (2, 8))])
def test_conv1d_shape_mismatch(fn, xs, ks):
    with pytest.raises(ValueError, match=r"`k` must have the signal shape \(8,\) of `x`"):
        fn(torch.zeros(xs), torch.zeros(ks))


@pytest.mark.parametrize("fn", [circular_conv2d_direct, fft_conv2d])
@pytest.mark.parametrize("xs,ks", [((4, 6), (6, 4)), ((4, 6), (4, 5)), ((3, 4, 6), (2, 4, 6)), ((4, 6), (1, 4, 6))])
def test_conv2d_shape_mismatch(fn, xs, ks):
    with pytest.raises(ValueError, match=r"`k` must have the signal shape \(4, 6\) of `x`"):
        fn(torch.zeros(xs), torch.zeros(ks))


@pytest.mark.parametrize("fn", [circular_conv2d_direct, fft_conv2d])
def test_conv2d_needs_two_dims(fn):
    with pytest.raises(ValueError, match="`x` must have at least 2 dimension"):
        fn(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="`k` must have at least 2 dimension"):
        fn(torch.zeros(4, 4), torch.zeros(4))


@pytest.mark.parametrize("fn", [circular_conv1d, fft_conv1d, circular_conv2d_direct, fft_conv2d])
def test_conv_bad_types(fn):
    with pytest.raises(TypeError, match="`k` must have a floating dtype"):
        fn(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        fn([[0.0] * 3] * 3, torch.zeros(3, 3))


# ---------------------------------------------------------------- spatial route used for timing

@pytest.mark.parametrize("hw,khw", [((1, 1), (1, 1)), ((5, 5), (3, 3)), ((6, 9), (6, 9)), ((7, 4), (2, 3)),
                                    ((8, 8), (1, 8))])
@pytest.mark.parametrize("depthwise", [False, True])
def test_conv2d_circular_spatial_matches_fft(hw, khw, depthwise):
    H, W = hw
    kh, kw = khw
    x = rand(2, 3, H, W, seed=H * W)
    k = rand(*((3,) if depthwise else ()), kh, kw, seed=kh * kw + 1)
    k_full = F.pad(k, (0, W - kw, 0, H - kh))
    torch.testing.assert_close(conv2d_circular_spatial(x, k), fft_conv2d(x, k_full), atol=1e-10, rtol=0)


def test_conv2d_circular_spatial_float32_and_shape():
    x, k = rand(4, 6, dtype=torch.float32), rand(4, 6, dtype=torch.float32, seed=1)
    y = conv2d_circular_spatial(x, k)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert_close(y, fft_conv2d(x.double(), k.double()), torch.float32, 4 * 6)     # 24 taps per output, float64 reference


def test_conv2d_circular_spatial_bad_input():
    x = torch.zeros(2, 3, 5, 5)
    with pytest.raises(ValueError, match="at most as large as the map"):
        conv2d_circular_spatial(x, torch.zeros(6, 3))
    with pytest.raises(ValueError, match=r"needs `x` of shape \(\.\.\., 4, H, W\)"):
        conv2d_circular_spatial(x, torch.zeros(4, 3, 3))
    with pytest.raises(ValueError, match=r"`k` must have shape \(kh, kw\) or \(C, kh, kw\)"):
        conv2d_circular_spatial(x, torch.zeros(1, 3, 3, 3))
    with pytest.raises(TypeError, match="must be real floating"):
        conv2d_circular_spatial(x.to(torch.complex64), torch.zeros(3, 3))


# ---------------------------------------------------------------- empty batches
# A batch of zero signals is valid input: the result is the empty tensor of the shape and dtype a non-empty batch gives.
# That is the library's definition, independent of what the FFT backend does with zero signals (some raise).
EMPTY_1D = [(0, 4), (3, 0, 8), (0, 2, 16)]


@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_ID)
@pytest.mark.parametrize("shape", EMPTY_1D)
def test_transforms_of_an_empty_batch(shape, dtype):
    x = torch.zeros(shape, dtype=dtype)
    for fn in (dft, idft, fft_radix2):
        X = fn(x)
        assert X.shape == x.shape and X.dtype == COMPLEX_OF[dtype], fn.__name__
    if 0 in shape[:-2]:                                              # also an empty batch of 2-D signals
        assert dft2(x).shape == x.shape and dft2(x).dtype == COMPLEX_OF[dtype]


@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_ID)
@pytest.mark.parametrize("xs,ks", [((0, 8), (8,)), ((3, 0, 8), (8,)), ((0, 3, 8), (3, 8))])
def test_conv1d_of_an_empty_batch(xs, ks, dtype):
    x, k = torch.zeros(xs, dtype=dtype), rand(*ks, dtype=dtype)
    for fn in (fft_conv1d, circular_conv1d):
        y = fn(x, k)
        assert y.shape == x.shape and y.dtype == dtype, fn.__name__


@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_ID)
@pytest.mark.parametrize("xs,ks", [((0, 5, 6), (5, 6)), ((0, 3, 5, 6), (3, 5, 6)), ((2, 0, 4, 1), (4, 1))])
def test_conv2d_of_an_empty_batch(xs, ks, dtype):
    x, k = torch.zeros(xs, dtype=dtype), rand(*ks, dtype=dtype)
    for fn in (fft_conv2d, circular_conv2d_direct):
        y = fn(x, k)
        assert y.shape == x.shape and y.dtype == dtype, fn.__name__
    if not dtype.is_complex:
        y = conv2d_circular_spatial(x, k)
        assert y.shape == x.shape and y.dtype == dtype


def test_empty_batch_keeps_the_autograd_graph():
    x = torch.zeros(0, 3, 5, 6, requires_grad=True)
    k = rand(3, 5, 6, dtype=torch.float32).requires_grad_()
    fft_conv2d(x, k).square().sum().backward()
    assert x.grad.shape == x.shape and torch.equal(k.grad, torch.zeros_like(k))


BATCHED = [(torch.fft.fft, 1, {}), (torch.fft.ifft, 1, {'norm': 'ortho'}), (torch.fft.rfft, 1, {'n': 10}),
           (torch.fft.irfft, 1, {}), (torch.fft.irfft, 1, {'n': 9}), (torch.fft.fft2, 2, {}), (torch.fft.ifft2, 2, {}),
           (torch.fft.rfft2, 2, {}), (torch.fft.rfft2, 2, {'s': (10, 12)}), (torch.fft.irfft2, 2, {'s': (8, 10)})]
BATCHED_CASES = [pytest.param(fn, nd, kw, dtype, id=f"{fn.__name__}-{i}-{DTYPE_ID(dtype)}")
                 for i, (fn, nd, kw) in enumerate(BATCHED) for dtype in ALL
                 if not (dtype.is_complex and fn in (torch.fft.rfft, torch.fft.rfft2))]   # rfft takes real input only


@pytest.mark.parametrize("fn,ndim,kw,dtype", BATCHED_CASES)
def test_batched_fft_defines_the_empty_batch(fn, ndim, kw, dtype):
    from niff_nb.fourier import batched_fft
    x = rand(2, 3, 8, 6, dtype=dtype)
    full = batched_fft(fn, x, ndim, **kw)
    torch.testing.assert_close(full, fn(x, **kw), rtol=0, atol=0)        # a non-empty batch: torch.fft itself
    for empty in (x[:0], x[:, :0], x[:0, :0]):
        y = batched_fft(fn, empty, ndim, **kw)
        want = full[:empty.shape[0], :empty.shape[1]]                       # what the same rows of a full batch give
        assert (y.shape, y.dtype, y.device) == (want.shape, want.dtype, want.device)


# ---------------------------------------------------------------- cost model and timing

@pytest.mark.parametrize("n,k,want", [(1, 1, 1), (8, 3, 576), (7, 5, 1225), (64, 64, 64 ** 4)])
def test_conv_cost_spatial(n, k, want):
    assert conv_cost_spatial(n, k) == want


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 1024])
def test_conv_cost_fft_powers_of_two(n):
    p2 = 2 * int(math.log2(n))  # log2(n^2), exact for powers of two
    assert conv_cost_fft(n) == 3 * n * n * p2 + n * n
    assert conv_cost_fft(n, n_transforms=2) == 2 * n * n * p2 + n * n
    assert conv_cost_fft(n, c=0.5) == 1.5 * n * n * p2 + n * n


def test_conv_cost_fft_grows_slower_than_spatial():
    ratios = [conv_cost_spatial(n, n) / conv_cost_fft(n) for n in (8, 16, 32, 64, 128)]
    assert all(b > a for a, b in zip(ratios, ratios[1:]))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: conv_cost_spatial(0, 3), ValueError, "`n` must be a positive int"),
    (lambda: conv_cost_spatial(8, -1), ValueError, "`k` must be a positive int"),
    (lambda: conv_cost_spatial(8.0, 3), TypeError, "`n` must be a positive int"),
    (lambda: conv_cost_fft(True), TypeError, "`n` must be a positive int"),
    (lambda: conv_cost_fft(8, n_transforms=1), ValueError, "`n_transforms` must be 2"),
    (lambda: conv_cost_fft(8, c=0), ValueError, "`c` must be a positive finite number"),
    (lambda: conv_cost_fft(8, c=float("nan")), ValueError, "`c` must be a positive finite number"),
])
def test_cost_model_bad_input(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("kwargs", [dict(n=8), dict(n=12, k=3), dict(n=4, channels=2, batch=2, device="cpu"),
                                    dict(n=8, dtype=torch.float64, warmup=0, repeats=1)])
def test_time_conv_returns_positive_finite(kwargs):
    t = time_conv(**{"repeats": 2, **kwargs})
    assert isinstance(t, ConvTiming)
    assert t.n == kwargs["n"] and t.k == kwargs.get("k", kwargs["n"])
    assert all(math.isfinite(v) and v > 0 for v in (t.spatial_ms, t.fft_ms))


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(n=8, k=9), ValueError, "`k` must be at most `n`"),
    (dict(n=0), ValueError, "`n` must be a positive int"),
    (dict(n=8, repeats=0), ValueError, "`repeats` must be a positive int"),
    (dict(n=8, warmup=-1), ValueError, "`warmup` must be a non-negative int"),
    (dict(n=8, channels=1.5), TypeError, "`channels` must be a positive int"),
    (dict(n=8, threads=0), ValueError, "`threads` must be a positive int"),
])
def test_time_conv_bad_input(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        time_conv(**kwargs)


def test_time_conv_restores_thread_setting():
    before = torch.get_num_threads()
    time_conv(8, repeats=1, threads=1)
    assert torch.get_num_threads() == before
