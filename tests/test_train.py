"""Trainer: steps, evaluation, checkpoints, SIGKILL + resume, DDP under torchrun (gloo on CPU), CLI errors, CUDA paths."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from niff_nb.train import (CheckpointError, TrainConfig, evaluate, fit, load_checkpoint, recipe, resolve_amp,
                           save_checkpoint, topk_correct, train_one_epoch)

FMNIST = Path('/usr/share/datasets/fashion-mnist')
needs_fmnist = pytest.mark.skipif(not (FMNIST / 'train-images-idx3-ubyte.gz').exists(),
                                  reason='needs Debian dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)')
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
BIN = Path(sys.executable).parent
TINY = ['--dataset', 'fashion-mnist', '--arch', 'smallcnn', '--subset', '512', '--test-subset', '256',
        '--batch-size', '64', '--no-progress', '--recipe', 'fashion-mnist-quick']


def free_port() -> str:
    "A TCP port free right now, for torchrun's rendezvous (a fixed port collides with another test run on the machine)."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def cli(name):
    exe = shutil.which(name) or str(BIN / name)
    return [exe]


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def test_two_steps_decrease_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    crit = nn.CrossEntropyLoss()
    before = crit(model(x), y).item()
    train_one_epoch(model, [(x, y), (x, y)], opt, None, crit, torch.device('cpu'), progress=False)
    assert crit(model(x), y).item() < before


def test_evaluate_on_hand_made_batch():
    logits = torch.tensor([[9., 0, 0, 0, 0, 0, 0],    # label 0: top-1
                           [0, 8, 9, 1, 2, 3, 4],      # label 1: second, so top-5 only
                           [0, 1, 2, 3, 4, 5, 6],      # label 2: fifth, top-5 only
                           [6, 5, 4, 3, 2, 1, 0]])     # label 6: last
    target = torch.tensor([0, 1, 2, 6])

    class Lookup(nn.Module):
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(1))
        def forward(self, i): return logits[i.long()] + self.w
    assert topk_correct(logits, target) == [1, 3]
    res = evaluate(Lookup(), [(torch.arange(2), target[:2]), (torch.arange(2, 4), target[2:])])
    assert res['n'] == 4 and res['top1'] == 0.25 and res['top5'] == 0.75
    ref = nn.functional.cross_entropy(logits.double(), target).item()
    assert abs(res['loss'] - ref) <= 16 * torch.finfo(torch.float32).eps * ref        # float32 log-softmax: a few eps


class Unpicklable:
    "An arbitrary object: loading it would need unpickling code, which weights_only refuses."


def test_checkpoint_atomic_and_weights_only(tmp_path):
    p = save_checkpoint(tmp_path / 'c.pt', {'model': {'w': torch.ones(2)}, 'epoch': 1, 'config': {'a': 1}})
    assert load_checkpoint(p)['epoch'] == 1
    assert [q.name for q in tmp_path.iterdir()] == ['c.pt']
    torch.save({'model': Unpicklable(), 'epoch': 1, 'config': {}}, tmp_path / 'evil.pt')
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint(tmp_path / 'evil.pt')


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty'])
def test_damaged_checkpoint_gives_clear_error(tmp_path, damage):
    p = save_checkpoint(tmp_path / 'last.pt', {'model': {'w': torch.ones(1000)}, 'epoch': 1, 'config': {}})
    data = p.read_bytes()
    p.write_bytes({'truncate': data[:len(data) // 2], 'garbage': b'not a checkpoint' * 10, 'empty': b''}[damage])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint(p)


@pytest.mark.parametrize('field,value,match', [
    ('lr', float('nan'), 'lr must be a positive finite number'), ('epochs', 0, 'epochs'), ('batch_size', 2.5, 'batch_size'),
    ('optimizer', 'adam', "'rmsprop'"), ('amp', 'fp8', "'bf16'"), ('dataset', 'mnist', "'fashion-mnist'"),
    ('label_smoothing', 1.0, 'label_smoothing'), ('weight_decay', float('inf'), 'weight_decay')])
def test_bad_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        recipe(**{field: value})


def test_fp16_needs_cuda():
    with pytest.raises(ValueError, match='needs a CUDA device'):
        resolve_amp('fp16', torch.device('cpu'))


def test_cli_bad_flags_exit_nonzero(tmp_path):
    r = run(cli('niff_train') + ['--epochs', 'many'])
    assert r.returncode == 2 and 'invalid int value' in r.stderr
    r = run(cli('niff_train') + ['--lr', '-1', '--out', str(tmp_path / 'x')])
    assert r.returncode == 2 and 'lr must be a positive' in r.stderr
    r = run(cli('niff_train') + ['--dataset', 'imagenet1k'])
    assert r.returncode == 2 and 'invalid choice' in r.stderr


def test_cli_unknown_arch_and_variant(tmp_path):
    r = run(cli('niff_train') + TINY + ['--arch', 'vgg99', '--out', str(tmp_path / 'a')])
    assert r.returncode != 0 and 'vgg99' in r.stderr and 'resnet18' in r.stderr
    r = run(cli('niff_train') + TINY + ['--variant', 'niff_huge', '--out', str(tmp_path / 'b')])
    assert r.returncode != 0 and 'niff_huge' in r.stderr and 'baseline' in r.stderr


def test_cli_missing_dataset(tmp_path):
    r = run(cli('niff_train') + ['--dataset', 'cifar10', '--data', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'o')])
    assert r.returncode == 1
    assert str(tmp_path / 'nothing') in r.stderr and 'download' in r.stderr


def test_cli_resume_without_checkpoint(tmp_path):
    r = run(cli('niff_train') + TINY + ['--out', str(tmp_path / 'empty'), '--resume'])
    assert r.returncode == 1 and 'nothing to resume' in r.stderr


@needs_fmnist
def test_corrupt_checkpoint_is_never_a_silent_restart(tmp_path):
    out = tmp_path / 'run'
    r = run(cli('niff_train') + TINY + ['--epochs', '1', '--variant', 'baseline', '--out', str(out)])
    assert r.returncode == 0, r.stderr
    ck = out / 'last.pt'
    ck.write_bytes(ck.read_bytes()[:1000])
    r = run(cli('niff_train') + TINY + ['--epochs', '2', '--variant', 'baseline', '--out', str(out), '--resume'])
    assert r.returncode == 1 and 'truncated or corrupt' in r.stderr
    assert [json.loads(l)['epoch'] for l in (out / 'metrics.jsonl').read_text().splitlines()] == [1]


@needs_fmnist
def test_sigkill_then_resume_logs_every_epoch_once(tmp_path):
    out = tmp_path / 'run'
    args = cli('niff_train') + TINY + ['--epochs', '4', '--variant', 'niff', '--subset', '2048', '--out', str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / 'last.pt').exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, 'no checkpoint within 300 s'
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(out / 'last.pt')['epoch']
    assert done < 4, 'the run finished before it could be killed; make it longer'
    r = run(args + ['--resume'])
    assert r.returncode == 0, r.stderr
    epochs = [json.loads(l)['epoch'] for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
    assert load_checkpoint(out / 'last.pt')['epoch'] == 4


DDP_SCRIPT = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist, torch.nn as nn
    from niff_nb.train import setup_distributed, train_one_epoch
    from niff_nb.data import make_loader
    from niff_nb.convert import create_model
    info = setup_distributed('cpu')
    assert info.world_size == 2 and dist.get_backend() == 'gloo'
    torch.manual_seed(0)                      # same initial weights on both ranks
    model = create_model('smallcnn', 'niff', num_classes=10, in_channels=1, input_size=28)
    ddp = nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    loader = make_loader(ds, 16, train=True, seed=0, distributed=True)
    assert len(loader) == 2                   # two steps: 64 samples / 2 ranks / batch 16
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    train_one_epoch(ddp, loader, opt, None, nn.CrossEntropyLoss(), torch.device('cpu'), progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    torch.save([p.detach() for p in model.parameters()], sys.argv[1] + f'/rank{info.rank}.pt')
    dist.destroy_process_group()
''')


def test_ddp_two_processes_gloo_identical_parameters(tmp_path):
    script = tmp_path / 'ddp_check.py'
    script.write_text(DDP_SCRIPT)
    torchrun = shutil.which('torchrun') or str(BIN / 'torchrun')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = run([torchrun, '--nproc_per_node', '2', '--master_port', free_port(), str(script), str(tmp_path)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    p0, p1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert len(p0) == len(p1) > 0
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))


@needs_fmnist
def test_niff_train_under_torchrun(tmp_path):
    torchrun = shutil.which('torchrun') or str(BIN / 'torchrun')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    out = tmp_path / 'ddp'
    r = run([torchrun, '--nproc_per_node', '2', '--master_port', free_port(), '--no-python'] + cli('niff_train') + TINY +
            ['--epochs', '1', '--device', 'cpu', '--out', str(out)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(l)['epoch'] for l in (out / 'metrics.jsonl').read_text().splitlines()] == [1]


# The AMP + channels-last step check runs on every device: tests/test_gpu_paths.py::test_amp_channels_last_step.


@cuda
@needs_fmnist
def test_nccl_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2: pytest.skip('needs two GPUs')
    torchrun = shutil.which('torchrun') or str(BIN / 'torchrun')
    out = tmp_path / 'nccl'
    r = run([torchrun, '--nproc_per_node', '2', '--master_port', free_port(), '--no-python'] + cli('niff_train') + TINY +
            ['--epochs', '1', '--device', 'auto', '--amp', '--out', str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(l)['epoch'] for l in (out / 'metrics.jsonl').read_text().splitlines()] == [1]


def test_old_import_paths_keep_working():
    "Names that moved or were renamed are still importable where they used to be."
    from niff_nb.train import BatchTransform, _read_metrics, get_dataset, make_loader, read_metrics, set_epoch, subset_dataset
    from niff_nb import data
    assert BatchTransform is data.BatchTransform and make_loader is data.make_loader and _read_metrics is read_metrics


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write anywhere')
def test_out_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    from niff_nb.train import RunFolderError
    ro = tmp_path / 'ro'
    ro.mkdir(); ro.chmod(0o555)
    try:
        with pytest.raises(RunFolderError, match='not writable'):
            fit(recipe('fashion-mnist-quick', out=str(ro / 'run'), device='cpu'))
    finally:
        ro.chmod(0o755)


def test_off_switches_an_option_off_and_leaves_amp_modes_alone():
    from niff_nb.train import _parser, config_from_args
    cfg = config_from_args(_parser().parse_args(['--recipe', 'convnext-adamw', '--ema-decay', 'off', '--amp', 'off', '--randaugment', 'none']))
    assert cfg.ema_decay is None and cfg.randaugment is None and cfg.amp == 'off'
    assert config_from_args(_parser().parse_args(['--recipe', 'convnext-adamw'])).ema_decay == 0.9999


def test_every_recipe_option_trains_on_tiny_cifar(tmp_path):
    "RandAugment, random erasing, MixUp/CutMix, stochastic depth, EMA and a step schedule in one short run; the EMA is what is evaluated."
    from niff_nb.data import fake_cifar10
    from niff_nb.train import fit, load_checkpoint, model_from_checkpoint, read_metrics, recipe
    data = fake_cifar10(tmp_path / 'cifar', n_train=40, n_test=20)
    cfg = recipe('resnet-sgd', arch='resnet18', variant='niff', dataset='cifar10', data=str(data), out=str(tmp_path / 'run'),
                 epochs=2, batch_size=20, lr_milestones=(1,), randaugment=9, randaugment_std=0.5, random_erasing=0.25,
                 mixup=0.8, cutmix=1.0, label_smoothing=0.1, stochastic_depth=0.1, ema_decay=0.9, device='cpu', progress=False,
                 model_kwargs={'stem': 'cifar'})
    res = fit(cfg)
    assert res['epochs'] == 2 and 0 <= res['test_acc'] <= 1
    log = read_metrics(tmp_path / 'run' / 'metrics.jsonl')
    assert [r['epoch'] for r in log] == [1, 2] and all('raw_test_top1' in r for r in log)
    # lr 0.1 at batch 256, scaled to batch 20, times 0.1 from the milestone at epoch 1 on (the log shows the rate after each epoch)
    assert [r['lr'] for r in log] == pytest.approx([0.1 * 20 / 256 * 0.1] * 2)
    ck = load_checkpoint(tmp_path / 'run' / 'last.pt')
    assert int(ck['ema']['n_averaged']) == 4                                   # 2 epochs x 2 steps
    ema, _ = model_from_checkpoint(tmp_path / 'run' / 'last.pt')
    raw, _ = model_from_checkpoint(tmp_path / 'run' / 'last.pt', weights='raw')
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), raw.state_dict().values()) if a.is_floating_point())
    assert [round(b.bn2.stochastic_depth.p, 6) for b in (raw.layer1[0], raw.layer4[1])] == [0.0, 0.1]
