"""GPU code paths, checked on every available device: CPU autocast stands in for CUDA where it can (bf16, and fp16 with a
CPU GradScaler); what only a GPU has (NCCL, cuFFT limits) lives in CUDA-only tests that skip cleanly. Test ids carry the
device, so `pytest -k cuda` selects the GPU half (the GPU check does)."""
import argparse
import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import niff_nb.train as T
from niff_nb.convert import create_model
import niff_nb.data as data
from niff_nb.core import ArgumentError
from niff_nb.train import (TrainConfig, fit, load_checkpoint, recipe, resolve_amp, resolve_device, setup_distributed,
                           train_one_epoch)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
DEVICES = ['cpu', pytest.param('cuda', marks=cuda)]


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


def tiny(fake, out, **kw):
    kw = {'variant': 'baseline', 'epochs': 1, 'data': str(fake), 'batch_size': 32, 'device': 'cpu', 'progress': False, **kw}
    return recipe('fashion-mnist-quick', out=str(out), **kw)


# ------------------------------------------------------------------------------------ GFNet and channels-last
@pytest.mark.parametrize('device', DEVICES)
def test_gfnet_trains_under_channels_last(tmp_path, fake, device):
    res = fit(tiny(fake, tmp_path / 'gf', variant='gfnet', channels_last=True, device=device))
    assert res['epochs'] == 1 and res['test_acc'] is not None


@pytest.mark.parametrize('device', DEVICES)
def test_channels_last_keeps_the_gfnet_filter_usable(device):
    m = create_model('smallcnn', 'gfnet', 10, in_channels=1, input_size=28).to(device)
    x = torch.randn(2, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    ref = m(x.contiguous())
    T.to_channels_last(m)
    assert m.stage1[0].filter.weight.is_contiguous() and m.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
    m.to(memory_format=torch.channels_last)                # what a user may do by hand: every 4-D parameter changes layout
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


def test_niff_train_gfnet_channels_last_cli(tmp_path, fake, capsys):
    from niff_nb.train import niff_train
    niff_train(['--recipe', 'fashion-mnist-quick', '--variant', 'gfnet', '--channels-last', '--data', str(fake), '--epochs', '1',
                '--batch-size', '32', '--device', 'cpu', '--no-progress', '--out', str(tmp_path / 'gf')])
    assert load_checkpoint(tmp_path / 'gf' / 'last.pt')['config']['channels_last'] is True


# --------------------------------------------------------------------------------- AMP: one step, a resume
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
def test_amp_channels_last_step(device, amp):
    "The old CUDA-only step check, on every device (CPU autocast and a CPU GradScaler stand in for fp16)."
    torch.manual_seed(0)
    model = create_model('smallcnn', 'niff', num_classes=10, in_channels=1, input_size=28).to(device).to(memory_format=torch.channels_last)
    dtype = resolve_amp(amp, torch.device(device)) if device == 'cuda' else {'fp16': torch.float16, 'bf16': torch.bfloat16}[amp]
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    r = train_one_epoch(model, [(x, y)] * 2, opt, None, nn.CrossEntropyLoss(), torch.device(device), dtype, scaler,
                        channels_last=True, progress=False)
    assert r['images'] == 32 and r['loss'] == r['loss']


@pytest.mark.parametrize('device', DEVICES)
def test_resume_across_amp_settings(tmp_path, fake, monkeypatch, device):
    "off → fp16 (the saved scaler state is empty) → bf16 → a plain resume keeps bf16; CPU autocast stands in for fp16 on CPU."
    out = tmp_path / 'run'
    if device == 'cpu':
        real = T.resolve_amp
        monkeypatch.setattr(T, 'resolve_amp', lambda amp, dev: torch.float16 if amp == 'fp16' else real(amp, dev))
    fit(tiny(fake, out, amp='off', device=device))
    fit(tiny(fake, out, amp='fp16', epochs=2, device=device), resume=True)
    ck = load_checkpoint(out / 'last.pt')
    assert ck['config']['amp'] == 'fp16' and ck['scaler'].get('scale', 0) > 0
    fit(tiny(fake, out, amp='bf16', epochs=3, device=device), resume=True)
    args = T._parser().parse_args(['--out', str(out), '--resume', '--epochs', '4'])
    assert T.resume_from_args(args).amp == 'bf16'


# ----------------------------------------------------------------------------------------- device rules
@pytest.fixture
def fake_torchrun(monkeypatch):
    "Process 1 of 2 under torchrun on a machine with two (pretend) GPUs; records what would reach CUDA and NCCL."
    calls = []
    monkeypatch.setenv('WORLD_SIZE', '2'); monkeypatch.setenv('RANK', '1'); monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: calls.append(('set_device', torch.device(d))))
    monkeypatch.setattr(T.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(T.dist, 'init_process_group', lambda backend, **k: calls.append(('init', backend)))
    return calls


def test_torchrun_uses_one_gpu_per_process_and_refuses_a_fixed_index(fake_torchrun):
    with pytest.raises(ArgumentError, match=r"cuda:0.*under torchrun.*CUDA_VISIBLE_DEVICES"):
        setup_distributed('cuda:0')
    assert fake_torchrun == []                                   # refused before any GPU was selected
    info = setup_distributed('cuda')
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert fake_torchrun == [('set_device', torch.device('cuda', 1)), ('init', 'nccl')]
    assert resolve_device('cuda', 1, 2) == resolve_device('auto', 1, 2) == torch.device('cuda', 1)
    assert resolve_device('cuda:1', 0, 1) == torch.device('cuda', 1)          # one process may pick any GPU
    with pytest.raises(ArgumentError, match='shows 2 GPU'):
        resolve_device('cuda:5')
    fake_torchrun.clear()
    setup_distributed('cpu')
    assert fake_torchrun == [('init', 'gloo')]


def test_auto_amp_picks_fp16_where_bf16_is_only_emulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'device', lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: including_emulation)   # e.g. a T4
    assert resolve_amp('auto', torch.device('cuda', 0)) == torch.float16
    assert resolve_amp('bf16', torch.device('cuda', 0)) == torch.bfloat16        # asked for explicitly: granted
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)                  # an A100/H100
    assert resolve_amp('auto', torch.device('cuda', 0)) == torch.bfloat16


def test_amp_defaults_agree_everywhere():
    from niff_nb.train import _parser, config_from_args
    assert TrainConfig().amp == 'auto'
    assert config_from_args(_parser().parse_args([])).amp == 'auto'
    assert config_from_args(_parser().parse_args(['--amp'])).amp == 'auto'
    assert config_from_args(_parser().parse_args(['--amp', 'off'])).amp == 'off'
    assert recipe('fashion-mnist-quick').amp == 'auto'                        # what niff_study trains with


def test_no_host_device_sync_per_step(monkeypatch):
    "The training loop reads device values (item, bool, tolist) once per SYNC_EVERY steps and at the end, not every step."
    torch.manual_seed(0)
    model = create_model('smallcnn', 'baseline', 10, in_channels=1, input_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))] * 30
    reads = []
    for name in ('item', 'tolist', '__bool__'):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: reads.append(_n) or _r(self, *a, **k))
    r = train_one_epoch(model, batches, opt, None, nn.CrossEntropyLoss(), 'cpu', progress=False, sync_every=10)
    monkeypatch.undo()
    assert r['images'] == 120 and r['syncs'] == 4
    assert len(reads) <= 4, reads


@cuda
def test_cuda_step_never_waits_for_the_device():
    "With CUDA's sync debug mode set to error, a training step that synchronised would raise."
    torch.manual_seed(0)
    model = create_model('smallcnn', 'baseline', 10, in_channels=1, input_size=28).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rt = T.Runtime(torch.device('cuda'), torch.bfloat16, True, None)
    from niff_nb.data import BatchTransform
    bt = BatchTransform()
    x, y = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8).pin_memory(), torch.randint(0, 10, (8,)).pin_memory()
    T.run_batch(model, (x, y), rt, nn.CrossEntropyLoss(), opt, batch_transform=bt)      # warm-up (allocations, statistics copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        tally = T.Tally('cuda')
        for _ in range(3):
            loss, logits, yy = T.run_batch(model, (x, y), rt, nn.CrossEntropyLoss(), opt, batch_transform=bt)
            tally.add(loss * yy.shape[0], logits, yy)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert tally.read()['n'] == 24
