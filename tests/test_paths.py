"""Workdirs on an object store (gs://), checked against an in-memory fake bucket.

The fake is an fsspec memory filesystem registered for the gs/gcs protocols,
which refuses to append as GCS does; etils.epath (used for every workdir file)
then reads and writes it like a bucket.
"""

import json
import os
import subprocess
import sys
import textwrap

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from conftest import REPO_ROOT
from entrorouter_jax import evaluate, paths
from entrorouter_jax.data import tokenizer as tokenizer_lib
from entrorouter_jax.writers import MetricsWriter


class FakeGCS(MemoryFileSystem):
  protocol = ('gs', 'gcs')
  store = {}          # its own bucket, apart from memory://
  pseudo_dirs = ['']

  def __init__(self, *args, finalize_on_close=False, **kwargs):
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return '/' + path.lstrip('/').rstrip('/')

  def _open(self, path, mode='rb', **kwargs):
    if 'a' in mode:
      raise OSError('GCS objects cannot be appended to')
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def bucket():
  fsspec.register_implementation('gs', FakeGCS, clobber=True)
  fsspec.register_implementation('gcs', FakeGCS, clobber=True)
  FakeGCS.store.clear()
  yield 'gs://bucket/run'
  FakeGCS.store.clear()


def test_paths_keep_remote_and_make_local_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.as_path('gs://b/x/y')) == 'gs://b/x/y'      # pathlib would give gs:/b/x/y
  assert str(paths.as_path('rel/dir')) == str(tmp_path / 'rel' / 'dir')
  assert paths.is_remote('gs://b/x') and not paths.is_remote('/tmp/x')
  paths.write_atomic(tmp_path / 'a' / 'f.txt', 'one')
  paths.write_atomic(tmp_path / 'a' / 'f.txt', 'two')
  assert (tmp_path / 'a' / 'f.txt').read_text() == 'two'
  assert sorted(p.name for p in (tmp_path / 'a').iterdir()) == ['f.txt']   # no temp left


def test_metrics_writer_on_a_bucket_rewrites_instead_of_appending(bucket):
  writer = MetricsWriter(bucket, remote_flush_seconds=0.0)
  assert writer.remote
  for step in (1, 2, 3):
    writer.write('sft', step, {'loss': np.float32(step), 'share': np.array([0.25, 0.75])},
                 ['a', 'b'])
  writer.close()
  metrics = paths.as_path(bucket) / 'metrics.jsonl'
  records = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3]
  assert records[0] == {'step': 1, 'stage': 'sft', 'loss': 1.0, 'share/a': 0.25, 'share/b': 0.75}
  events = list((paths.as_path(bucket) / 'tensorboard').iterdir())
  assert len(events) == 1 and events[0].name.startswith('events.out.tfevents')
  assert events[0].stat().length > 0

  # A resumed run: records past the restored step go, new ones follow.
  resumed = MetricsWriter(bucket, remote_flush_seconds=3600.0)
  resumed.truncate('sft', 2)
  resumed.write('sft', 3, {'loss': np.float32(30.0)}, ['a', 'b'])
  assert [json.loads(l)['loss'] for l in metrics.read_text().splitlines()] == [1.0, 2.0]
  resumed.close()   # the flush interval has not passed: close uploads
  assert [json.loads(l)['loss'] for l in metrics.read_text().splitlines()] == [1.0, 2.0, 30.0]


def test_tokenizer_and_results_on_a_bucket(bucket):
  texts = [f'query number {i} about topic {i % 7}' for i in range(200)]
  tok = tokenizer_lib.load_or_train(f'{bucket}/tokenizer.model', texts, 60)
  again = tokenizer_lib.Tokenizer.load(f'{bucket}/tokenizer.model')
  np.testing.assert_array_equal(again.encode(texts[3], 16)[0], tok.encode(texts[3], 16)[0])
  path = evaluate.write_results(bucket, {'accuracy': 0.5})
  assert str(path) == f'{bucket}/eval/results.json'
  assert json.loads(path.read_text()) == {'accuracy': 0.5}


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch when it can (seconds per run); the writer keeps
  it out, writes its events, and leaves torch importable afterwards."""
  script = textwrap.dedent(f"""
      import importlib.util, pathlib, sys
      from entrorouter_jax.writers import MetricsWriter
      writer = MetricsWriter({str(tmp_path)!r})
      writer.write('sft', 1, {{'loss': 1.5}}, ['a'])
      writer.close()
      assert 'torch' not in sys.modules, ('torch was imported or left blocked',
                                          sys.modules.get('torch'))
      events = list(pathlib.Path({str(tmp_path)!r}, 'tensorboard').iterdir())
      assert len(events) == 1 and events[0].stat().st_size > 0, events
      if importlib.util.find_spec('torch') is not None:   # installed: still importable
        import torch
      """)
  subprocess.run([sys.executable, '-c', script], check=True, cwd=REPO_ROOT,
                 env=dict(os.environ, JAX_PLATFORMS='cpu'))
