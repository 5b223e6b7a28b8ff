"""Run folders, checkpoints, resume and the niff_train/niff_study commands, on tiny generated data (seconds, no Debian copy needed).

The policy under test lives in `niff_nb.train` (`T.RunDir`, `RunLog`, `fit`): checks before writes, staging + swap for new runs,
an OS lock per folder, the user's files untouched, nothing non-finite recorded, digests on checkpoints, resume from the
stored configuration.
"""
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import niff_nb.data as data
import niff_nb.train as T
from niff_nb.data import DatasetNotFoundError
from niff_nb.train import CheckpointError, fit, load_checkpoint, model_from_checkpoint, niff_train, recipe, save_checkpoint

# names this suite introduced are used as T.<name>, so that each test fails on its own where one is missing


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


def tiny(fake, out, **kw):
    kw = {'variant': 'baseline', 'epochs': 1, 'data': str(fake), 'batch_size': 32, 'device': 'cpu', 'progress': False, **kw}
    return recipe('fashion-mnist-quick', out=str(out), **kw)


def cli_args(fake, out, *more):
    return ['--recipe', 'fashion-mnist-quick', '--variant', 'baseline', '--data', str(fake), '--batch-size', '32',
            '--device', 'cpu', '--no-progress', '--out', str(out), *more]


def run_cli(argv, capsys):
    "niff_train in this process: (exit code, stdout, stderr)."
    try: niff_train(argv); code = 0
    except SystemExit as e: code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def strict_lines(path):
    "Every line of a metrics log parsed as strict JSON (a bare NaN or Infinity is an error)."
    def no(c): raise ValueError(f'bare {c} in {path}')
    return [json.loads(line, parse_constant=no) for line in Path(path).read_text().splitlines()]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


# ---------------------------------------------------------------------------------------------- --overwrite
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, fake, monkeypatch):
    out = tmp_path / 'run'
    fit(tiny(fake, out))
    before = snapshot(out)
    seen = []
    real = T.train_one_epoch
    def crash_after_looking(*a, **k):
        seen.append(snapshot(out))                  # what --out holds while the new run trains
        real(*a, **k)
        raise RuntimeError('the machine went down')
    monkeypatch.setattr(T, 'train_one_epoch', crash_after_looking)
    with pytest.raises(RuntimeError, match='went down'):
        fit(tiny(fake, out, lr=1e-3), overwrite=True)
    assert seen == [before] and snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.run.')], 'a staging folder was left behind'
    monkeypatch.setattr(T, 'train_one_epoch', real)
    res = fit(tiny(fake, out, lr=1e-3), overwrite=True)   # a replacement that gets its first checkpoint takes the place
    assert res['epochs'] == 1 and load_checkpoint(out / 'last.pt')['config']['lr'] == 1e-3


def test_every_check_runs_before_anything_is_written(tmp_path, fake, monkeypatch):
    out = tmp_path / 'run'
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)        # tensorboard is not installed
    with pytest.raises(ImportError, match='pip install tensorboard'):
        fit(tiny(fake, out, tensorboard=True))
    assert not out.exists()
    with pytest.raises(DatasetNotFoundError):
        fit(tiny(fake, out, data=str(tmp_path / 'no-data')))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_buffer_stops_before_the_checkpoint_and_resume_works(tmp_path, fake, monkeypatch):
    out = tmp_path / 'run'
    fit(tiny(fake, out))
    good = (out / 'last.pt').read_bytes()
    real = T.train_one_epoch
    def last_bad_step(model, *a, **k):
        r = real(model, *a, **k)
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        with torch.no_grad(): bn.running_var.fill_(float('inf'))
        return r
    monkeypatch.setattr(T, 'train_one_epoch', last_bad_step)
    with pytest.raises(T.NonFiniteError, match=r'running_var.*last good checkpoint.*epoch 1') as e:
        fit(tiny(fake, out, epochs=2), resume=True)
    assert str(out / 'last.pt') in str(e.value)
    assert (out / 'last.pt').read_bytes() == good
    assert [r['epoch'] for r in strict_lines(out / 'metrics.jsonl')] == [1]
    monkeypatch.setattr(T, 'train_one_epoch', real)
    assert fit(tiny(fake, out, epochs=2), resume=True)['epochs'] == 2


def test_nonfinite_eval_loss_is_never_written_to_the_metrics(tmp_path, fake, monkeypatch):
    out = tmp_path / 'run'
    real = T.evaluate
    monkeypatch.setattr(T, 'evaluate', lambda *a, **k: {**real(*a, **k), 'loss': float('nan')})
    with pytest.raises(T.NonFiniteError, match='test_loss'):
        fit(tiny(fake, out))
    assert not out.exists()                                   # a new run that never got a checkpoint leaves nothing
    monkeypatch.setattr(T, 'evaluate', real)
    fit(tiny(fake, out))
    monkeypatch.setattr(T, 'evaluate', lambda *a, **k: {**real(*a, **k), 'loss': float('inf')})
    with pytest.raises(T.NonFiniteError):
        fit(tiny(fake, out, epochs=2), resume=True)
    assert [r['epoch'] for r in strict_lines(out / 'metrics.jsonl')] == [1]


def test_diverging_training_loss_keeps_the_last_checkpoint(tmp_path, fake, monkeypatch):
    out = tmp_path / 'run'
    fit(tiny(fake, out))
    good = (out / 'last.pt').read_bytes()
    real = T.train_one_epoch
    def diverge(model, loader, optimizer, *a, **k):
        for g in optimizer.param_groups: g['lr'] = 1e12
        return real(model, loader, optimizer, *a, **k)
    monkeypatch.setattr(T, 'train_one_epoch', diverge)
    with pytest.raises(T.NonFiniteError, match=r'NaN or infinite.*last good checkpoint.*epoch 1'):
        fit(tiny(fake, out, epochs=2), resume=True)
    assert (out / 'last.pt').read_bytes() == good
    assert [r['epoch'] for r in strict_lines(out / 'metrics.jsonl')] == [1]


# -------------------------------------------------------------------------------------------------- --data
def test_explicit_data_root_is_the_only_place_searched_by_niff_train(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, 'FASHION_MNIST_DIR', data.fake_fashion_mnist(tmp_path / 'system', n_train=64, n_test=32))
    mine = data.fake_fashion_mnist(tmp_path / 'mine', n_train=64, n_test=32)
    for split in ('train', 'test'):
        d = tmp_path / f'only-{split}'
        d.mkdir()
        for f in data._FMNIST_FILES['test' if split == 'train' else 'train']: (d / f'{f}.gz').write_bytes((mine / f'{f}.gz').read_bytes())
        code, _, err = run_cli(cli_args(d, tmp_path / f'out-{split}', '--epochs', '1'), capsys)
        assert code == 1 and str(d) in err and 'only that directory is searched' in err, err
        assert not (tmp_path / f'out-{split}').exists()


# ------------------------------------------------------------------------------------------------- --resume
def test_plain_resume_rebuilds_the_run_from_its_checkpoint(tmp_path, fake, capsys):
    out = tmp_path / 'run'
    code, _, err = run_cli(cli_args(fake, out, '--epochs', '1', '--lr', '0.003', '--amp', 'bf16', '--seed', '5'), capsys)
    assert code == 0, err
    code, _, err = run_cli(['--out', str(out), '--resume', '--epochs', '2', '--no-progress'], capsys)
    assert code == 0, err
    cfg = load_checkpoint(out / 'last.pt')['config']
    assert (cfg['epochs'], cfg['lr'], cfg['amp'], cfg['seed'], cfg['arch'], cfg['variant']) == (2, 0.003, 'bf16', 5, 'smallcnn', 'baseline')
    assert [m['epoch'] for m in T.read_metrics(out / 'metrics.jsonl')] == [1, 2]


def test_resume_refuses_flags_that_differ_and_lists_them(tmp_path, fake, capsys):
    out = tmp_path / 'run'
    assert run_cli(cli_args(fake, out, '--epochs', '1'), capsys)[0] == 0
    before = snapshot(out)
    code, _, err = run_cli(cli_args(fake, out, '--resume', '--epochs', '2', '--lr', '0.1', '--batch-size', '16'), capsys)
    assert code == 2 and 'lr: 0.004 in the checkpoint, 0.1 asked for' in err and 'batch_size: 32' in err, err
    code, _, err = run_cli(cli_args(fake, out, '--resume', '--epochs', '2', '--variant', 'niff'), capsys)
    assert code == 2 and "variant: 'baseline' in the checkpoint, 'niff' asked for" in err and 'Traceback' not in err
    with pytest.raises(T.ArgumentError, match="arch: 'smallcnn' in the checkpoint, 'resnet18' asked for"):
        fit(dataclasses.replace(tiny(fake, out, epochs=2), arch='resnet18'), resume=True)
    assert snapshot(out) == before


def test_resuming_a_finished_run_says_so(tmp_path, fake, capsys):
    out = tmp_path / 'run'
    assert run_cli(cli_args(fake, out, '--epochs', '1'), capsys)[0] == 0
    before = snapshot(out)
    code, stdout, err = run_cli(['--out', str(out), '--resume'], capsys)
    assert code == 0 and 'already finished' in stdout and 'epoch 1 of 1' in stdout, (stdout, err)
    assert snapshot(out) == before


def test_resume_across_amp_settings_keeps_the_scaler_sane(tmp_path, fake, monkeypatch):
    "A run saved without fp16 (its disabled GradScaler saved {}) resumed with fp16: CPU fp16 autocast stands in for CUDA."
    out = tmp_path / 'run'
    fit(tiny(fake, out, amp='off'))
    assert load_checkpoint(out / 'last.pt')['scaler'] == {}
    real = T.resolve_amp
    monkeypatch.setattr(T, 'resolve_amp', lambda amp, device: torch.float16 if amp == 'fp16' else real(amp, device))
    res = fit(tiny(fake, out, amp='fp16', epochs=2), resume=True)
    ck = load_checkpoint(out / 'last.pt')
    assert res['epochs'] == 2 and ck['config']['amp'] == 'fp16' and ck['scaler']['scale'] > 0
    fit(tiny(fake, out, amp='bf16', epochs=3), resume=True)
    assert load_checkpoint(out / 'last.pt')['config']['amp'] == 'bf16'


# --------------------------------------------------------------------------------------------------- locks
def test_two_processes_cannot_share_one_out(tmp_path, fake):
    out = tmp_path / 'run'
    out.mkdir()
    fd = T.lock_folder(out)                             # another process (an open file description of its own) holds it
    try:
        with pytest.raises(T.RunFolderError, match='in use by another process'):
            fit(tiny(fake, out))
    finally:
        os.close(fd)
    fit(tiny(fake, out))


def test_a_killed_run_leaves_no_stale_lock(tmp_path, fake):
    out = tmp_path / 'run'
    out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); '
                               'fcntl.flock(fd, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(60)', str(out / '.lock')],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(T.RunFolderError, match='in use'):
        T.RunDir(out).open('new')
    holder.kill(); holder.wait()
    T.RunDir(out).open('new').close()


# -------------------------------------------------------------------------------------------- user's files
@pytest.mark.parametrize('overwrite', [False, True])
def test_files_of_the_user_are_never_overwritten(tmp_path, fake, overwrite):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'config.json').write_text('{"my": "settings"}')
    (out / 'notes.txt').write_text('do not touch')
    with pytest.raises(FileExistsError, match=r'not part of a run: notes\.txt'):
        fit(tiny(fake, out), overwrite=overwrite)
    assert (out / 'config.json').read_text() == '{"my": "settings"}' and (out / 'notes.txt').read_text() == 'do not touch'


def test_niff_study_refuses_an_existing_study(tmp_path, fake, capsys):
    from niff_nb.study import niff_study
    out = tmp_path / 'study'
    fit(tiny(fake, out / 'baseline'))
    (out / 'summary.json').write_text('{}')
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob('*')}
    argv = ['--out', str(out), '--data', str(fake), '--epochs', '1', '--subset', '32', '--device', 'cpu', '--no-progress']
    with pytest.raises(SystemExit) as e:
        niff_study(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'already holds a study' in err and '--overwrite' in err, err
    (out / 'my-notes.txt').write_text('mine')
    with pytest.raises(SystemExit) as e:
        niff_study(argv + ['--overwrite'])
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'my-notes.txt' in err, err
    (out / 'my-notes.txt').unlink()
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob('*')} == before


# --------------------------------------------------------------------------------- leftovers and permissions
def test_leftover_temporary_files_are_cleaned_and_all_run_files_share_one_mode(tmp_path, fake):
    out = tmp_path / 'run'
    fit(tiny(fake, out))
    for name in ('.last.pt.abcd1234.tmp', 'last.pt.zz9_k2m1.tmp', '.metrics.jsonl.q1w2e3r4.tmp'):
        (out / name).write_bytes(b'half a file')
    (tmp_path / '.run.new-a1b2c3d4').mkdir()                     # a staging folder of a killed start
    fit(tiny(fake, out, epochs=2), resume=True)
    assert sorted(p.name for p in out.iterdir()) == ['.lock', 'config.json', 'last.pt', 'metrics.jsonl']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run']
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


# ------------------------------------------------------------------------------------------------- SIGINT
def test_sigint_ends_with_one_line_naming_the_last_checkpoint(tmp_path, fake):
    out = tmp_path / 'run'
    args = [sys.executable, '-c', 'from niff_nb.train import niff_train; niff_train()'] + cli_args(fake, out, '--epochs', '500')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / 'last.pt').exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, 'no checkpoint within 120 s'
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == 130, err
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert str(out / 'last.pt') in lines[0] and '--resume' in lines[0]
    epoch = load_checkpoint(out / 'last.pt')['epoch']
    assert f'(epoch {epoch})' in lines[0]
    assert [m['epoch'] for m in T.read_metrics(out / 'metrics.jsonl')] == list(range(1, epoch + 1))


# ---------------------------------------------------------------------------------------- checkpoint damage
def test_one_flipped_byte_is_detected(tmp_path):
    p = save_checkpoint(tmp_path / 'last.pt', {'model': {'w': torch.full((4096,), 0.5)}, 'epoch': 1, 'config': {}})
    data_ = p.read_bytes()
    pattern = torch.tensor([0.5]).numpy().tobytes() * 4
    where = [data_.find(pattern) + 5, len(data_) // 2, len(data_) - 3, 3, 12]
    assert where[0] > 5
    for i in where:
        bad = bytearray(data_); bad[i] ^= 0x10
        (tmp_path / 'bad.pt').write_bytes(bad)
        with pytest.raises(CheckpointError, match='truncated or corrupt|checkpoint format'):
            load_checkpoint(tmp_path / 'bad.pt')
    assert torch.equal(load_checkpoint(p)['model']['w'], torch.full((4096,), 0.5))


def test_checkpoints_with_bad_config_or_epoch_are_clear_errors(tmp_path, fake):
    out = tmp_path / 'run'
    fit(tiny(fake, out))
    ck = load_checkpoint(out / 'last.pt')
    for name, change, match in [('unknown', lambda c: {**c, 'learning_rate': 1.0}, r"unknown fields \['learning_rate'\]"),
                                ('missing', lambda c: {k: v for k, v in c.items() if k != 'arch'}, r"missing fields \['arch'\]"),
                                ('bad', lambda c: {**c, 'lr': -1.0}, 'lr must be a positive')]:
        save_checkpoint(tmp_path / f'{name}.pt', {**ck, 'config': change(ck['config'])})
        with pytest.raises(CheckpointError, match=match):
            model_from_checkpoint(tmp_path / f'{name}.pt')
    save_checkpoint(tmp_path / 'neg.pt', {**ck, 'epoch': -3})
    with pytest.raises(CheckpointError, match='epoch must be an int >= 0; got -3'):
        load_checkpoint(tmp_path / 'neg.pt')
    save_checkpoint(out / 'last.pt', {**ck, 'config': {**ck['config'], 'learning_rate': 1.0}})
    with pytest.raises(CheckpointError, match='unknown fields'):
        fit(tiny(fake, out, epochs=2), resume=True)


# ------------------------------------------------------------------------------------------ bad --out paths
@pytest.mark.parametrize('kind', ['file', 'under-file', 'loop'])
def test_bad_out_is_refused_before_the_data_loads(tmp_path, fake, monkeypatch, capsys, kind):
    (tmp_path / 'a-file').write_text('x')
    os.symlink(tmp_path / 'l2', tmp_path / 'l1'); os.symlink(tmp_path / 'l1', tmp_path / 'l2')
    out = {'file': tmp_path / 'a-file', 'under-file': tmp_path / 'a-file' / 'run', 'loop': tmp_path / 'l1' / 'run'}[kind]
    def no_data(*a, **k): raise AssertionError('the data was loaded before --out was checked')
    monkeypatch.setattr(data, 'load_fashion_mnist', no_data)
    with pytest.raises(T.RunFolderError, match={'file': 'is a file', 'under-file': 'lies under', 'loop': 'symbolic link loop'}[kind]):
        fit(tiny(fake, out))
    code, _, err = run_cli(cli_args(fake, out, '--epochs', '1'), capsys)
    assert code == 1 and 'niff_train: error' in err and 'Traceback' not in err


def test_truncated_last_line_of_the_metrics_log_names_the_file(tmp_path, fake, capsys):
    out = tmp_path / 'run'
    fit(tiny(fake, out))
    (out / 'metrics.jsonl').write_text((out / 'metrics.jsonl').read_text() + '{"epoch": 2, "train_lo')
    with pytest.raises(T.MetricsError, match=r'metrics\.jsonl, line 2: not a complete JSON record'):
        fit(tiny(fake, out, epochs=3), resume=True)
    code, _, err = run_cli(['--out', str(out), '--resume', '--epochs', '3'], capsys)
    assert code == 1 and str(out / 'metrics.jsonl') in err and 'Traceback' not in err, err


def test_unreadable_image_in_an_imagefolder_run(tmp_path, capsys):
    from PIL import Image
    root = tmp_path / 'tree'
    for split in ('train', 'val'):
        for c, colour in (('a', (255, 0, 0)), ('b', (0, 0, 255))):
            (root / split / c).mkdir(parents=True)
            for j in range(2): Image.new('RGB', (12, 12), colour).save(root / split / c / f'{j}.png')
    (root / 'train' / 'b' / '9.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    argv = ['--dataset', 'imagefolder', '--data', str(root), '--arch', 'smallcnn', '--variant', 'baseline', '--epochs', '1',
            '--batch-size', '5', '--device', 'cpu', '--no-progress', '--recipe', 'fashion-mnist-quick']
    code, _, err = run_cli(argv + ['--out', str(tmp_path / 'stop')], capsys)
    assert code == 1 and str(root / 'train' / 'b' / '9.png') in err and '--bad-images skip' in err, err
    with pytest.warns(UserWarning, match='skipping unreadable image'):
        code, _, err = run_cli(argv + ['--out', str(tmp_path / 'skip'), '--bad-images', 'skip'], capsys)
    assert code == 0, err
    assert load_checkpoint(tmp_path / 'skip' / 'last.pt')['config']['bad_images'] == 'skip'
