"Tests of niff_nb.cost (FLOP formulas on known cases) and niff_nb.bench (the benchmark's structure, niff_bench's CLI). Timings are never asserted."
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from fastcore.test import test_eq as eq_, test_fail as fail_
from niff_nb import bench, cost
from niff_nb.bench import BenchResult, RawFFTFilter, benchmark, model_benchmark, niff_bench
from niff_nb.cost import FlopCount, count_flops, fft_flops, layer_flops
from niff_nb.layers import NIFFConv2d, NIFFDepthwise


# --- FLOPs ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('n,real,expected', [(1024, True, 25_600), (1024, False, 51_200), (8, True, 60), (1, True, 0),
                                             (64 * 64, True, 2.5 * 4096 * 12), (12, False, round(5 * 12 * 3.584962500721156))])
def test_fft_flops_known(n, real, expected):
    eq_(fft_flops(n, real), round(expected))


def test_fft_flops_bad_args():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match='n must be a positive int'): fft_flops(bad)
    with pytest.raises(ValueError, match='batch'): fft_flops(8, batch=0)


@pytest.mark.parametrize('h,w', [(32, 32), (7, 9), (1, 16)])
def test_count_flops_ffts(h, w):
    x = torch.randn(2, 3, h, w)
    n = h * w
    eq_(int(count_flops(torch.fft.rfft2, x)), fft_flops(n, batch=6))
    eq_(int(count_flops(lambda z: torch.fft.irfft2(z, s=(h, w)), torch.fft.rfft2(x))), fft_flops(n, batch=6))
    xc = x.to(torch.complex64)
    eq_(int(count_flops(torch.fft.fft2, xc)), fft_flops(n, real=False, batch=6))
    eq_(int(count_flops(torch.fft.ifft2, xc)), fft_flops(n, real=False, batch=6))
    eq_(int(count_flops(lambda t: torch.fft.rfft(t, dim=-1), x)), fft_flops(w, batch=6 * h))


def test_count_flops_convs_linear_complex():
    x = torch.randn(2, 8, 10, 12)
    eq_(int(count_flops(nn.Conv2d(8, 16, 3, padding=1, bias=False), x)), 2 * 2 * 8 * 16 * 9 * 120)
    eq_(int(count_flops(nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False), x)), 2 * 2 * 2 * 16 * 9 * 120)
    eq_(int(count_flops(nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False), x)), 2 * 2 * 8 * 25 * 120)
    eq_(int(count_flops(nn.Linear(12, 5), torch.randn(3, 12))), 2 * 3 * 12 * 5)
    a, b = torch.randn(3, 4, dtype=torch.complex64), torch.randn(3, 4, dtype=torch.complex64)
    eq_(int(count_flops(torch.mul, (a, b))), 6 * 12)
    eq_(int(count_flops(lambda u, v: u * v, (a, b.real))), 2 * 12)
    eq_(int(count_flops(torch.mul, (a.real, b.real))), 0)                 # real element-wise: 0 by convention
    eq_(int(count_flops(torch.mm, (a, b.T.contiguous()))), 4 * 2 * 3 * 4 * 3)
    eq_(int(count_flops(torch.mm, (a.real, b.real.T.contiguous()))), 2 * 3 * 4 * 3)
    eq_(int(count_flops(nn.ReLU(), x)), 0)


def test_flopcount_object_and_backward():
    m, x = NIFFDepthwise(8, 'small'), torch.randn(2, 8, 12, 10)
    f = count_flops(m, x)
    assert isinstance(f, FlopCount) and isinstance(f, int)
    eq_(f.total, int(f)); eq_(f.fft + f.without_fft, int(f))
    eq_(f.by_op['_fft_r2c'], fft_flops(120, batch=16)); eq_(f.by_op['_fft_c2r'], fft_flops(120, batch=16))
    eq_(f.by_op['mul'], 6 * 2 * 8 * 12 * 6)
    assert 'NIFFDepthwise' in f.by_module and f.by_module['NIFFDepthwise'] == int(f)
    fb = count_flops(m, x, backward=True)
    assert fb > f and fb.by_op['_fft_r2c'] == 2 * f.by_op['_fft_r2c']      # the backward: one rfft2 of the output gradient
    assert all(p.grad is not None for p in m.parameters())
    assert 'FlopCount(' in repr(f)


def test_count_flops_errors_and_meta():
    fail_(lambda: count_flops(nn.Identity(), 'x'), contains='inputs must be')
    fail_(lambda: count_flops(3, torch.zeros(1)), contains='model must be')
    fail_(lambda: count_flops(nn.Identity(), torch.zeros(1), backward='yes'), contains='backward must be')
    fail_(lambda: count_flops(nn.Identity(), torch.zeros(1), backward=True), contains='requires grad')
    with torch.device('meta'):
        m, x = NIFFConv2d(4, 4, 'small'), torch.empty(1, 4, 16, 16)
    assert count_flops(m, x) > 0


def test_layer_flops_figure8_cases():
    r = layer_flops(28, channels=16, batch=2)
    eq_(r['conv 3x3'], 2 * 2 * 16 * 9 * 28 * 28)
    eq_(r['spatial (map-sized)'], 2 * 2 * 16 * 29 * 29 * 28 * 28)
    eq_(r['NIFF'] - r['NIFF without FFTs'], 2 * fft_flops(28 * 28, batch=2 * 16))
    eq_(layer_flops(28, channels=16, batch=7)['NIFF MLP'], r['NIFF MLP'])       # the filter is batch-independent
    fail_(lambda: layer_flops(0), contains='n must be')


# --- benchmark -----------------------------------------------------------------------------------------------------
class _Counter(nn.Module):
    def __init__(self, log, name):
        super().__init__(); self.log, self.name, self.lin = log, name, nn.Linear(4, 4)
    def forward(self, x):
        self.log.append(self.name); return self.lin(x)


def test_benchmark_structure_ratios_and_alternation():
    log = []
    fns = {'a': _Counter(log, 'a'), 'b': _Counter(log, 'b'), 'c': _Counter(log, 'c')}
    fns['b'].eval()
    r = benchmark(fns, torch.randn(3, 4), modes=('forward', 'train'), repeats=6, warmup=2, threads=1)
    assert isinstance(r, BenchResult)
    eq_(r.modes, ['forward', 'train']); eq_(r.names, ['a', 'b', 'c'])
    for m in r.modes:
        for n in r.names: eq_(len(r.times[m][n]), 6)
        eq_(r.ratio('a', m), 1.0)
        for n in r.names:
            eq_(r.ratio(n, m), statistics.median(r.times[m][n]) / statistics.median(r.times[m]['a']))
            eq_(r.paired_ratio(n, m), statistics.median(x / y for x, y in zip(r.times[m][n], r.times[m]['a'])))
    # per mode: 2 warm-up calls each, then rounds whose order rotates, then one memory call each
    timed = log[6:6 + 18]
    eq_(timed[:3], ['a', 'b', 'c']); eq_(timed[3:6], ['b', 'c', 'a']); eq_(timed[6:9], ['c', 'a', 'b'])
    eq_(len(log), 2 * (6 + 18 + 3))
    eq_(fns['a'].training, True); eq_(fns['b'].training, False)              # modes restored
    rows = r.rows()
    eq_(len(rows), 6); eq_(set(rows[0]), {'name', 'mode', 'median_ms', 'ratio', 'paired_ratio', 'peak_mb', 'runs'})
    assert 'ratio' in r.table() and 'paired' in r.table()


def test_benchmark_baseline_threads_and_callables():
    old = torch.get_num_threads()
    x = torch.randn(2, 4, 8, 8)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    r = benchmark({'fn': lambda t: conv(t) * 2, 'conv': conv}, x, modes='train_dx', repeats=3, warmup=0, baseline='conv',
                  threads=1, memory=False)
    eq_(r.ratio('conv', 'train_dx'), 1.0); eq_(r.memory, {})
    eq_(torch.get_num_threads(), old)
    assert conv.weight.grad is None                         # gradients reset after the run


def test_benchmark_peak_memory_cpu():
    def f(x):
        a = torch.empty(1 << 18)          # 1 MiB
        b = torch.empty(1 << 18)          # 2 MiB alive
        del a
        c = torch.empty(1 << 17)          # 1.5 MiB alive
        return x + 0
    r = benchmark({'f': f}, torch.zeros(4), modes='forward', repeats=1, warmup=0)
    eq_(r.memory["forward"]["f"], (1 << 20) * 2)            # a and b alive at once; c and the output come after a is freed


def test_benchmark_bad_args():
    conv, x = nn.Conv2d(1, 1, 1), torch.randn(1, 1, 2, 2)
    fail_(lambda: benchmark({}, x), contains='non-empty mapping')
    fail_(lambda: benchmark({'a': 3}, x), contains="fns['a']")
    fail_(lambda: benchmark({'a': conv}, x, modes=('slow',)), contains="'forward'")
    fail_(lambda: benchmark({'a': conv}, x, repeats=0), contains='repeats')
    fail_(lambda: benchmark({'a': conv}, x, warmup=-1), contains='warmup')
    fail_(lambda: benchmark({'a': conv}, x, threads=0), contains='threads')
    fail_(lambda: benchmark({'a': conv}, x, baseline='b'), contains='baseline')
    fail_(lambda: benchmark({'a': lambda t: t * 1}, torch.randn(2), modes='train', repeats=1, warmup=0), contains='requires grad')


def test_raw_filter_plain_equals_fused():
    torch.manual_seed(0)
    a, b = RawFFTFilter(3, 9, 8), RawFFTFilter(3, 9, 8, fused=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 9, 8)
    assert a(x).dtype == b(x).dtype == torch.float32
    a, b = a.double(), b.double()                          # float64: the same maths up to ~1e-16
    x = x.double()
    close = lambda u, v: (u - v).abs().max() <= 1e-12 * v.abs().max()
    assert close(a(x), b(x))
    a(x).square().sum().backward(); b(x).square().sum().backward()
    assert close(a.weight.grad, b.weight.grad)
    fail_(lambda: a(torch.randn(1, 3, 8, 8)), contains='built for')
    fail_(lambda: RawFFTFilter(0, 3, 3), contains='channels')


def test_raw_filter_accepts_an_empty_batch():
    y = RawFFTFilter(3, 9, 8)(torch.zeros(0, 3, 9, 8))
    eq_((y.shape, y.dtype), ((0, 3, 9, 8), torch.float32))


def test_layer_and_model_benchmarks_small():
    r = bench.layer_benchmark(8, 4, 2, modes=('forward', 'train_dx'), spatial=True, repeats=2, warmup=1, threads=1)
    eq_(r.baseline, 'raw filter')
    assert {'NIFFDepthwise', 'conv 3x3 (dw)', 'spatial 9x9 (dw)', 'raw filter (fft_filter)'} <= set(r.names)
    m = model_benchmark('smallcnn', ('baseline', 'niff'), batch=2, size=16, repeats=2, warmup=0, threads=1)
    eq_(m.names, ['baseline', 'niff']); eq_(m.ratio('baseline', 'train'), 1.0)
    assert m.extra['niff']['params'] < m.extra['baseline']['params'] * 10 and m.extra['niff']['gflops'] > 0
    assert 'smallcnn niff' in bench.model_table({'smallcnn': m})
    fail_(lambda: model_benchmark('smallcnn', 'niff'), contains='variants must be')


def test_benchmarks_use_the_one_model_registry():
    from niff_nb import convert, zoo
    fail_(lambda: model_benchmark('smallcnn', ('baseline', 'nope')), contains="variants='nope' is not supported")
    def tiny(model, *, stem=False, input_size=None):
        model.niff_report = convert.ConversionReport([], 0, 0)
        return model
    zoo.register_variant('tiny_bench_test', tiny)
    try:
        m = model_benchmark('smallcnn', ('baseline', 'tiny_bench_test'), batch=2, size=16, repeats=1, warmup=0, threads=1, flops=False)
        eq_(m.names, ['baseline', 'tiny_bench_test'])
    finally:
        del zoo._CONVERTERS['tiny_bench_test']


def test_old_cost_names_still_import():
    from niff_nb.cost import benchmark as b1, niff_bench as n1, TARGETS
    assert b1 is bench.benchmark and n1 is bench.niff_bench and TARGETS is bench.TARGETS
    with pytest.raises(AttributeError): cost.no_such_name


def test_paper_convention_counts_full_complex_ffts():
    r = layer_flops(14, channels=8, batch=3)
    eq_(r["NIFF (paper's code)"] - r['NIFF MLP'], 2 * fft_flops(14 * 14, real=False, batch=24) + 6 * 24 * 14 * 14)
    eq_(r['NIFF'] - r['NIFF without FFTs'], 2 * fft_flops(14 * 14, batch=24))
    x = torch.randn(2, 8, 14, 14, dtype=torch.float64)
    layer = __import__('niff_nb.layers', fromlist=['NIFFDepthwise']).NIFFDepthwise(8, 'small', bias=False).double()
    with torch.no_grad(): torch.testing.assert_close(cost.paper_form(layer)(x), layer(x))   # the same operator


# --- niff_bench ----------------------------------------------------------------------------------------------------
def test_niff_bench_quick_prints_tables(capsys):
    eq_(niff_bench(['--quick', '--what', 'layers,models', '--threads', '1']), None)
    out = capsys.readouterr().out
    for s in ('Depthwise layers: batch 4, 8 channels, 16x16', 'NIFFDepthwise', 'raw filter', 'resnet18 baseline', 'resnet18 niff',
              'Tables A5/A6 as ratios', 'paired'):
        assert s in out, s


@pytest.mark.parametrize('argv', [['--what', 'all'], ['--variants', 'baseline,nope'], ['--archs', 'vgg16'], ['--repeats', '0'],
                                  ['--layer-sizes', '0'], ['--layer-sizes', 'a,b'], ['--device', 'tpu'], ['--warmup', '-1'],
                                  ['--modes', 'fast']])
def test_niff_bench_bad_args_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e: niff_bench(argv)
    eq_(e.value.code, 2)
    assert 'niff_bench' in capsys.readouterr().err


def test_niff_bench_console_script():
    out = subprocess.run([sys.executable, '-c', 'import sys; from niff_nb.bench import niff_bench; niff_bench(sys.argv[1:])', '--help'],
                         capture_output=True, text=True, timeout=120)
    eq_(out.returncode, 0)
    for opt in ('--archs', '--variants', '--quick', '--device', '--spatial'): assert opt in out.stdout


def test_targets_declared():
    eq_(set(bench.TARGETS), {'niff_vs_raw_train', 'niff_vs_raw_eval_b1', 'spatial_vs_niff_28', 'resnet18_niff_vs_baseline'})
    for desc, op, goal in bench.TARGETS.values(): assert op in ('<=', '>=') and goal > 0


DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.mark.parametrize('device', DEVICES)
def test_benchmark_on_each_device(device):
    conv, x = nn.Conv2d(4, 4, 3, padding=1).to(device), torch.randn(2, 4, 16, 16, device=device)
    r = benchmark({'conv': conv, 'niff': NIFFDepthwise(4, 'small').to(device)}, x, repeats=3, warmup=1)
    eq_(r.info['device'], str(x.device))
    assert r.memory['train']['niff'] > 0
    eq_(count_flops(conv, x).by_op['convolution'], 2 * (2 * 4 * 16 * 16) * (4 * 9))      # 2 · outputs · (Cin · 3 · 3)
    fail_(lambda: count_flops(nn.Identity(), torch.zeros(1, device=device), backward=True), contains='requires grad')
    with torch.device('meta'):
        m, xm = NIFFConv2d(4, 4, 'small'), torch.empty(1, 4, 16, 16)
    assert count_flops(m, xm) > 0
    assert torch.backends.cudnn.benchmark is False            # the autotuner is switched on for CUDA runs only, and restored


def test_cuda_timer_measures_the_device_it_is_given(monkeypatch):
    "Events and synchronisation must act on the measured device, not the current one (cuda:0), e.g. for --device cuda:1."
    log = []
    class Event:
        def __init__(self, enable_timing): pass
        def record(self): log.append(('record', current[0]))
        def synchronize(self): pass
        def elapsed_time(self, other): return 5.0
    current = ['cuda:0']
    class device_ctx:
        def __init__(self, d): self.d = str(d)
        def __enter__(self): self.old = current[0]; current[0] = self.d
        def __exit__(self, *a): current[0] = self.old
    monkeypatch.setattr(torch.cuda, 'Event', Event)
    monkeypatch.setattr(torch.cuda, 'device', device_ctx)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda d=None: log.append(('sync', str(d))))
    t = bench._timer(torch.device('cuda:1'))
    eq_(t(lambda: None), 0.005)
    eq_(log, [('sync', 'cuda:1'), ('record', 'cuda:1'), ('record', 'cuda:1')])
