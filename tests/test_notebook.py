"""The Colab demo notebook runs end to end (tiny training, evaluation, routing)."""

import importlib.util
import json
import sys

import pytest

from conftest import REPO_ROOT

NOTEBOOKS = REPO_ROOT / 'notebooks'
NOTEBOOK = NOTEBOOKS / 'entrorouter_demo.ipynb'


def _text(outputs) -> str:
  """Every stream, text/plain, text/markdown and text/html output, joined."""
  parts = []
  for out in outputs:
    if out.get('output_type') == 'stream':
      parts.append(out.get('text', ''))
    elif out.get('output_type') == 'error':
      parts.append('\n'.join(out.get('traceback', [])))
    else:
      data = out.get('data', {})
      parts += [data[k] for k in ('text/plain', 'text/markdown', 'text/html') if k in data]
  return '\n'.join(p if isinstance(p, str) else ''.join(p) for p in parts)


def _cell(nb, tag):
  cells = [c for c in nb.cells if tag in c.get('metadata', {}).get('tags', [])]
  assert len(cells) == 1, f'expected one cell tagged {tag!r}, found {len(cells)}'
  return cells[0]


def _python3_kernel_for_this_interpreter(tmp_path, monkeypatch) -> str:
  """A `python3` kernelspec that runs sys.executable, first on JUPYTER_PATH.

  A fresh CI machine may have no kernelspec at all, and a user's `python3` may
  point at another interpreter; either way the notebook must run here.
  """
  from jupyter_client.kernelspec import KernelSpecManager
  spec_dir = tmp_path / 'jupyter' / 'kernels' / 'python3'
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'Python 3 (tests)', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  spec = KernelSpecManager().get_kernel_spec('python3')
  assert spec.argv[0] == sys.executable, spec.argv
  return 'python3'


def test_committed_notebook_has_no_outputs_and_matches_its_generator():
  nbformat = pytest.importorskip('nbformat', reason='nbformat is not installed')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, (
          f'{NOTEBOOK.name}: stored outputs in cell {cell.get("id")}; run notebooks/make_demo.py')
  spec = importlib.util.spec_from_file_location('make_demo', NOTEBOOKS / 'make_demo.py')
  make_demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_demo)
  want = make_demo.build()
  assert [c.source for c in nb.cells] == [c.source for c in want.cells], (
      f'{NOTEBOOK.name} differs from notebooks/make_demo.py; rerun python notebooks/make_demo.py')


def test_demo_notebook_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat', reason='nbformat is not installed')
  hint = "(pip install -e '.[test]')"
  nbclient = pytest.importorskip('nbclient', reason=f'nbclient is not installed {hint}')
  pytest.importorskip('ipykernel', reason=f'ipykernel is not installed {hint}')
  kernel_name = _python3_kernel_for_this_interpreter(tmp_path, monkeypatch)
  workdir = tmp_path / 'router'
  # The kernel inherits this process's environment.
  monkeypatch.setenv('ENTROROUTER_DEMO_WORKDIR', str(workdir))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name=kernel_name,
                                   resources={'metadata': {'path': str(NOTEBOOKS)}})
  try:
    client.execute()
  finally:   # the executed copy, for a look when something fails
    nbformat.write(nb, tmp_path / 'executed.ipynb')

  everything = _text([o for c in nb.cells if c.cell_type == 'code' for o in c.outputs])
  assert 'Traceback' not in everything
  assert 'expected utility at lambda' in _text(_cell(nb, 'train').outputs)
  evaluated = _text(_cell(nb, 'evaluate').outputs)
  assert 'expected utility at lambda' in evaluated and 'AIQ: EntroRouter' in evaluated

  # The run wrote everything into the workdir the test gave it.
  names = json.loads((workdir / 'router.json').read_text())['model_names']
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert 'aiq' in results and 'baselines' in results and 'train_seconds' in results
  for name in ('report.md', 'curve.png', 'shares.png', 'training.png'):
    assert (workdir / 'eval' / name).is_file(), name

  # Both routing tables name models of the pool, one row per query.
  for tag in ('route', 'route-cost'):
    table = _text(_cell(nb, tag).outputs)
    routed = [n for n in names if n in table]
    assert routed, f'no model of {names} in the output of the {tag!r} cell:\n{table}'
    assert 'number theory' in table
