"""The nightly step of a serving loop (`python -m entrorouter_jax.learn`): a decision directory
written by hand as the server writes one, for the tiny router of conftest's `serve_workdir`,
joined, trained on off-policy, estimated, and the new router written or not."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import feedback as feedback_config
from conftest import REPO_ROOT
from entrorouter_jax import evaluate, learn, router as router_lib
from entrorouter_jax import workdir as workdir_lib
from entrorouter_jax.data import sources

ENV = dict(os.environ, JAX_PLATFORMS='cpu')
TINY = {'rl.num_steps': 4, 'rl.batch_size': 32, 'log_every': 2, 'eval_batch_size': 64}
CONTRACT = {'ips', 'snips', 'dr', 'logging', 'improves'}


@pytest.fixture(scope='module')
def logdir(serve_workdir, tmp_path_factory):
  """A server's --decisions directory: one chat decision line per training query of the tiny
  router (its exploring choice at 0.2, with the propensity), one /v1/route line, one failed
  line; the synthetic outcome of each choice as the score of all but the last 5 rows."""
  directory = tmp_path_factory.mktemp('decisions')
  data = sources.load_splits(workdir_lib.read_config(serve_workdir).data, ('train',))[1]['train']
  router = router_lib.load_router(serve_workdir)
  choice, propensity, dist = router.sample(data.queries.tolist(), explore=0.2, seed=1)
  explored = choice != np.argmax(dist, axis=1)
  lines, scores = [], []
  for i, text in enumerate(data.queries.tolist()):
    model = router.model_names[choice[i]]
    lines.append({
        'id': f'chatcmpl-{i}', 'time': 1.7e9 + i, 'endpoint': 'chat', 'text': text,
        'model': model, 'answered_by': model, 'propensity': float(propensity[i]),
        'explored': bool(explored[i]), 'cost_weight': None, 'version': 'v1',
        'usage': {'prompt_tokens': 20, 'completion_tokens': 30},
        'cost': float(data.costs[i, choice[i]]), 'latency_ms': 12.5, 'status': 200,
        'fallbacks': []})
    if i < data.num_queries - 5:
      scores.append({'id': f'chatcmpl-{i}', 'score': float(data.outcomes[i, choice[i]]),
                     'time': 1.8e9 + i})
  lines.append({**lines[0], 'id': 'route-1', 'endpoint': 'route', 'answered_by': None,
                'usage': None, 'cost': None, 'latency_ms': None})
  lines.append({**lines[1], 'id': 'failed-1', 'status': 502, 'cost': None})
  half = len(lines) // 2
  for name, part in (('decisions-0001.jsonl', lines[:half]),
                     ('decisions-0002.jsonl', lines[half:]),
                     ('feedback-0001.jsonl', scores)):
    (directory / name).write_text(''.join(json.dumps(l) + '\n' for l in part))
  return directory, data.num_queries


def tiny_config(tmp_path):
  config = feedback_config.get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  for key, value in TINY.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  return config


def run_learn(*args):
  return subprocess.run([sys.executable, '-m', 'entrorouter_jax.learn', *map(str, args)],
                        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True)


def test_forced_run_writes_the_log_the_estimate_and_a_loadable_router(
    serve_workdir, logdir, tmp_path):
  directory, n = logdir
  out = tmp_path / 'R1'
  got = run_learn(f'--workdir={serve_workdir}', f'--decisions={directory}', f'--out={out}',
                  '--force', f'--config.data.data_dir={tmp_path / "tfds"}',
                  *(f'--config.{k}={v}' for k, v in TINY.items()))
  assert got.returncode == 0, got.stderr[-3000:]
  log = (out / 'feedback.csv').read_text().splitlines()
  assert log[0] == 'id,query,model,score,cost,propensity,cost_weight,time,policy'
  assert len(log) == 1 + n          # the route call and the failure dropped
  results = json.loads((out / 'eval' / 'offpolicy.json').read_text())
  assert CONTRACT <= set(results) and {'utility', 'ci95'} <= set(results['dr'])
  # judged on the log's test split only: rows the new router was not trained on
  from entrorouter_jax.data import readers
  test = readers.read_feedback([str(out / 'feedback.csv')]).split('test')
  judged_test = int(np.sum(np.any(test.outcome_mask, axis=1)))
  assert 0 < results['rows'] == judged_test < n - 5
  assert isinstance(results['improves'], bool)
  assert set(results['vs_init']) == {'gain', 'lower', 'improves'}   # against R0's own policy
  assert results['vs_init']['lower'] <= results['vs_init']['gain']
  assert 'utility' in results['logging'] and "paired DR gain over R0's policy" in got.stdout
  assert f'{out} written' in got.stdout and 'logging policy\'s realised' in got.stdout
  assert not (out / '.staging').exists()
  assert (out / 'checkpoints' / 'rl').is_dir()
  router = router_lib.load_router(out)
  assert router.model_names == router_lib.load_router(serve_workdir).model_names
  probs = router.probs(['What is 17 times 23?'])
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  assert workdir_lib.read_config(out).rl.init_checkpoint == str(serve_workdir.absolute())


def test_without_a_win_r1_keeps_only_the_log_and_the_estimate(
    serve_workdir, logdir, tmp_path, monkeypatch, capsys):
  """The verdict forced to 'no' (a log on which the new router is judged not to beat R0)."""
  real = evaluate.offpolicy_results       # what training writes for the log's test split
  calls = []

  def no_win(*args, **kwargs):
    calls.append(1)
    return {**real(*args, **kwargs), 'improves': False}

  monkeypatch.setattr(evaluate, 'offpolicy_results', no_win)
  out = tmp_path / 'R1'
  learned = learn.learn(serve_workdir, logdir[0], out, tiny_config(tmp_path))
  assert calls and not learned.written
  assert sorted(p.relative_to(out).as_posix() for p in out.rglob('*')) == [
      'eval', 'eval/offpolicy.json', 'feedback.csv']
  results = json.loads((out / 'eval' / 'offpolicy.json').read_text())
  assert results['improves'] is False and CONTRACT <= set(results)
  text = learn.verdict(learned)
  assert 'not written (the new router does not show a win over R0' in text
  assert f"{results['dr']['utility']:.4f}" in text
  assert f"{results['logging']['utility']:.4f}" in text


@pytest.mark.parametrize('improves, vs_init, wins', [
    (True, True, True), (True, False, False), (False, True, False), (True, None, False)])
def test_r1_needs_both_lower_bounds(improves, vs_init, wins):
  results = {'improves': improves}
  if vs_init is not None:
    results['vs_init'] = {'gain': 0.1, 'lower': 0.01 if vs_init else -0.01, 'improves': vs_init}
  assert learn.wins(results) is wins


def test_bad_input_exits_2_naming_it(serve_workdir, logdir, tmp_path):
  out = tmp_path / 'R1'
  out.mkdir()
  (out / 'something').write_text('x')
  got = run_learn(f'--workdir={serve_workdir}', f'--decisions={logdir[0]}', f'--out={out}')
  assert got.returncode == 2 and 'Traceback' not in got.stderr, got.stderr[-3000:]
  assert f'error: --out={out}: exists and is not empty' in got.stderr
  assert (out / 'something').read_text() == 'x' and len(list(out.iterdir())) == 1


def test_bad_workdir_unjudged_log_and_set_data_files_are_refused_before_writing(
    serve_workdir, logdir, tmp_path):
  config = tiny_config(tmp_path)
  out = tmp_path / 'R1'
  with pytest.raises(learn.LearnError, match=r'--workdir=.*config.json is missing'):
    learn.learn(tmp_path, logdir[0], out, config)
  unjudged = tmp_path / 'unjudged'
  unjudged.mkdir()
  for path in logdir[0].glob('decisions-*.jsonl'):
    (unjudged / path.name).write_text(path.read_text())
  with pytest.raises(learn.LearnError, match=r'--decisions=.*no judged row'):
    learn.learn(serve_workdir, unjudged, out, config)
  config.data.files = 'other.csv'
  with pytest.raises(learn.LearnError, match=r'--config.data.files=other.csv: set by learn'):
    learn.learn(serve_workdir, logdir[0], out, config)
  assert not out.exists()
