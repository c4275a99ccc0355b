"""The import graph flows one way: no circles, and routing never imports training."""

import ast
import collections
import os
import subprocess
import sys

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / 'entrorouter_jax'


def _graph() -> dict[str, set[str]]:
  """module -> the package modules it imports anywhere in its file (lazy imports too)."""
  modules = {}
  for path in PACKAGE.rglob('*.py'):
    name = '.'.join(path.relative_to(REPO_ROOT).with_suffix('').parts)
    modules[name.removesuffix('.__init__')] = path
  edges = collections.defaultdict(set)
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('entrorouter_jax'):
        for alias in node.names:
          full = f'{node.module}.{alias.name}'
          target = full if full in modules else node.module
          if target != name:
            edges[name].add(target)
      elif isinstance(node, ast.Import):
        edges[name].update(a.name for a in node.names
                           if a.name.startswith('entrorouter_jax') and a.name != name)
  return {m: edges[m] & set(modules) for m in modules}


def _reach(graph, start) -> set[str]:
  seen, stack = set(), [start]
  while stack:
    for nxt in graph[stack.pop()]:
      if nxt not in seen:
        seen.add(nxt)
        stack.append(nxt)
  return seen


def test_no_import_circles():
  graph = _graph()
  circles = sorted(m for m in graph if m in _reach(graph, m))
  assert not circles, f'modules on an import circle: {circles}'


def test_routing_never_imports_the_trainer():
  graph = _graph()
  for module in ('router', 'route', 'policy', 'state', 'model', 'features', 'capability',
                 'serve', 'calibrate', 'batching', 'serving.app'):
    reached = _reach(graph, f'entrorouter_jax.{module}')
    assert 'entrorouter_jax.train' not in reached, module
    assert 'entrorouter_jax.suite' not in reached, module


def test_serving_reads_no_tables():
  """The server reads its pool with data.pool: neither the table readers (pandas) nor the
  trainer are reachable from it, nor loaded when it is imported."""
  graph = _graph()
  for module in ('serve', 'serving.app'):
    reached = _reach(graph, f'entrorouter_jax.{module}')
    assert 'entrorouter_jax.data.readers' not in reached, module
    assert 'entrorouter_jax.train' not in reached, module
  code = ('import sys, entrorouter_jax.serve, entrorouter_jax.serving.app; '
          'print(sorted(m for m in ("entrorouter_jax.data.readers", "entrorouter_jax.train") '
          'if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]'
