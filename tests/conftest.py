"""Shared test fixtures: where the real routing data lives, and CPU-only JAX."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get('ENTROROUTER_SHARED_DATA', REPO_ROOT.parent / 'shared' / 'data'))


def shared_path(*parts: str) -> pathlib.Path:
  """A file under ../shared/data, or a skip naming what is missing."""
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f'real routing data not found at {path} '
                '(expected ../shared/data beside the repository root, '
                'or set ENTROROUTER_SHARED_DATA)')
  return path
