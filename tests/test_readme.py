"""README.md is generated from nbs/index.ipynb and must stay in sync with it."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def index_cells():
    nb = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())
    return [(c['cell_type'], ''.join(c['source'])) for c in nb['cells']]


def test_every_index_cell_is_in_readme():
    readme = (ROOT / 'README.md').read_text()
    for kind, src in index_cells():
        assert src.strip() in readme, f"README.md is out of date with nbs/index.ipynb ({kind} cell: {src[:60]!r}); " \
                                      "regenerate it: jupyter nbconvert --to markdown --stdout nbs/index.ipynb > README.md"


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_second():
    readme = (ROOT / 'README.md').read_text()
    setup = readme.split('## Set up', 1)[1].split('\n## ', 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2, commands
    assert 'pip install -e ".[dev]"' in commands[0] and commands[0].rstrip().endswith('niff_study')
    assert 'apt-get install -y dataset-fashion-mnist' in commands[0]
    assert commands[1].startswith('nbdev_test')
    assert "grep -m1 -E '^nbdev_test" in (ROOT / '.ci' / 'run').read_text()
