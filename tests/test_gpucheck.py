"""The prepared GPU check (`python -m niff_nb.gpucheck`), end to end in its CPU dry-run mode."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


def test_gpu_check_dry_run_end_to_end(tmp_path, monkeypatch, capsys):
    "`python -m niff_nb.gpucheck --dry-run --device cpu`: every step runs and passes, and one table is printed."
    argv = ['--dry-run', '--device', 'cpu', '--out', str(tmp_path), '--variants', 'baseline,niff,gfnet',
            '--tests', str(TESTS / 'test_gpu_paths.py')]
    monkeypatch.setattr(sys, 'argv', ['python -m niff_nb.gpucheck', *argv])
    runpy.run_module('niff_nb.gpucheck', run_name='__main__', alter_sys=False)
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert [r['result'] for r in rows if r['result'] != 'pass'] == [], out
    checks = [r['check'] for r in rows]
    assert checks[:2] == ['environment', "pytest -k 'cuda or nccl'"]
    assert [c for c in checks if c.startswith('train ')] == [f'train {v} {a}' for a in ('off', 'bf16') for v in ('baseline', 'niff', 'gfnet')]
    for name in ('resume across AMP settings', 'compile niff off (eager)', 'host sync every step', 'niff_bench'):
        assert any(c.startswith(name) for c in checks), (name, checks)
    assert next(r for r in rows if r['check'] == 'resume across AMP settings')['detail'].startswith('off -> bf16 -> bf16')
    assert next(r for r in rows if r['check'] == 'train niff bf16')['speed'].endswith('x baseline')
    assert sum(l.startswith('check ') for l in out.splitlines()) == 1 and '0 failed' in out and (tmp_path / 'gpu_check.txt').read_text().strip() == out.strip()


def test_gpu_check_rows_for_failures_and_its_arguments(tmp_path, monkeypatch, capsys):
    import niff_nb.gpucheck as G
    from niff_nb.convert import all_variants
    with pytest.raises(SystemExit) as e:
        G.niff_gpu_check(['--device', 'cpu'])
    assert e.value.code == 2 and 'dry-run' in capsys.readouterr().err
    def broken(argv): raise RuntimeError('CUDA error: an illegal memory access was encountered')
    monkeypatch.setattr(G, 'niff_train', broken)
    rows = G.gpu_check('cpu', out=tmp_path, dry_run=True, variants=['niff'], pytest=False, bench=False, budget_s=60)
    train = next(r for r in rows if r.check == 'train niff off')
    assert train.result == 'FAIL' and 'illegal memory access' in train.detail
    assert any(r.check.startswith('host sync') and r.result == 'pass' for r in rows)      # the other steps still ran
    rows = G.gpu_check('cpu', out=tmp_path / 'b', dry_run=True, variants=['niff'], pytest=False, bench=False, budget_s=0)
    assert {r.result for r in rows[1:]} == {'skip'}
    table = G.format_table([G.Row('a'), G.Row('b', 'FAIL'), G.Row('c', 'skip')])
    assert table.splitlines()[-1].startswith('1 passed, 1 failed, 1 skipped')
    assert len(all_variants()) >= 13            # the full check trains every one of these, in both precisions
