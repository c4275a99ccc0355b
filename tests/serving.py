"""What the serving tests share: a tiny trained router, local upstreams, the server in a
subprocess (conftest.py's `serve_workdir` and `served` fixtures run these once a session)."""

import contextlib
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import httpx
import pytest

from benchmarks.fake_upstream import Upstreams, free_port, wait_until_healthy
from configs import rl as rl_config
from entrorouter_jax import train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

TOKEN = 'test-token-3f9a'
UPSTREAM_KEY = 'sk-upstream-secret-77c1'
QUERIES = ['Prove that the sum of two even numbers is even.',
           'Write a Python function that reverses a list.',
           'Can my landlord keep the deposit for normal wear and tear?',
           'What is 17 times 23?']


def tiny_default_config(tmp_path):
  """The default recipe (utility head, cross-fitted members) at a tiny size, TF-IDF only."""
  config = rl_config.get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.synthetic.update(num_train=600, num_validation=50, num_test=200)
  config.anchor.update(space='tfidf', dim=32, k=20)
  config.model.update(members=2, hidden=32)
  config.sft.update(num_steps=30, batch_size=32, soft_weight_choices='', select_every=10)
  config.rl.update(num_steps=10, batch_size=32, select_every=5)
  config.eval_batch_size = 64
  return config


def slug(name: str) -> str:
  return re.sub(r'[^a-z0-9]+', '-', name.lower())


def train_tiny_router(tmp) -> pathlib.Path:
  """Trains the tiny default-recipe router into tmp/run and returns that workdir."""
  train.train_and_evaluate(tiny_default_config(tmp), tmp / 'run')
  return tmp / 'run'


@contextlib.contextmanager
def running_server(workdir, tmp, *extra_flags, prices=None):
  """`python -m entrorouter_jax.serve` on `workdir` in a subprocess, every pool model's
  base_url on one local Upstreams, each priced (price_in, price_out) as `prices` says
  (default 1.0, 1.0): yields (base URL, Upstreams, pool names, log path)."""
  names = json.loads((workdir / 'router.json').read_text())['model_names']
  upstreams = Upstreams()
  prices = prices or {}
  pool = {n: {'price_in': prices.get(n, (1.0, 1.0))[0], 'price_out': prices.get(n, (1.0, 1.0))[1],
              'base_url': upstreams.url(slug(n)),
              'upstream_model': f'up-{slug(n)}', 'api_key_env': 'UPSTREAM_KEY'} for n in names}
  (tmp / 'pool.json').write_text(json.dumps(pool))
  port = free_port()
  log_path = tmp / 'serve.log'
  env = dict(os.environ, JAX_PLATFORMS='cpu', ER_TOKEN=TOKEN, UPSTREAM_KEY=UPSTREAM_KEY)
  with log_path.open('w') as log:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'entrorouter_jax.serve', f'--workdir={workdir}',
         f'--pool={tmp / "pool.json"}', f'--port={port}', '--auth_token_env=ER_TOKEN',
         '--upstream_timeout=2', '--max_wait_ms=20', '--max_batch=32', '--max_body_bytes=65536',
         *extra_flags],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  base = f'http://127.0.0.1:{port}'
  try:
    if not wait_until_healthy(base, proc, 240):
      pytest.fail(f'the server did not come up: {log_path.read_text()[-3000:]}')
    yield base, upstreams, names, log_path
  finally:
    proc.terminate()
    proc.wait(30)
    upstreams.close()


def auth():
  return {'authorization': f'Bearer {TOKEN}'}


def client(base):
  import openai
  return openai.OpenAI(base_url=f'{base}/v1', api_key=TOKEN, max_retries=0)


def route_of(base, query, **extra):
  r = httpx.post(f'{base}/v1/route', json={'query': query, **extra}, headers=auth())
  assert r.status_code == 200, r.text
  return r.json()


@contextlib.contextmanager
def serve_log_to(caplog):
  """caplog's handler on the server's logger itself: `logs.show_progress_logs` (run by an
  earlier CLI test in the same process) stops the package's loggers propagating to root."""
  logger = logging.getLogger('entrorouter_jax.serve')
  logger.addHandler(caplog.handler)
  try:
    yield
  finally:
    logger.removeHandler(caplog.handler)
