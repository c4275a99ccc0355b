"""The quality suite's data sets: the defaults in ../shared/data, and --datasets specs.

  NAME=FORMAT:PATH[+PATH...]   FORMAT: wide | long | routerdc | routellm | routerbench
  default                      every default data set whose files are here

Each becomes a `Dataset`: a name and the `config.data` overrides that read it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('ENTROROUTER_SHARED_DATA', REPO.parent / 'shared' / 'data'))
FORMATS = ('wide', 'long', 'routerdc', 'routellm', 'routerbench')


@dataclasses.dataclass
class Dataset:
  name: str
  data: dict                  # config.data overrides
  about: str = ''


def default_datasets() -> list[Dataset]:
  """../shared/data's routing sets, in the form `config.data` takes them."""
  pool = lambda name: str(REPO / 'configs' / 'pools' / name)
  rdc = [SHARED / 'routerdc7' / f'{task}{sep}{split}.json'
         for task, sep in (('mmlu', '_'), ('gsm8k', '-'), ('cmmlu', '_'),
                           ('arc_challenge', '_'), ('humaneval', '_'))
         for split in ('train', 'test')]
  return [
      Dataset('routerbench', dict(name='routerbench', manual_dir=str(SHARED / 'routerbench')),
              'RouterBench subset (ARC, MBPP, Winogrande) x 11 LLMs; RouterDC\'s split'),
      Dataset('routellm_mmlu', dict(name='routing_files', format='routellm',
                                    files=str(SHARED / 'routellm' / 'mmlu_responses'),
                                    pool=pool('routellm.yaml')),
              'RouteLLM MMLU, GPT-4 vs Mixtral; list prices x estimated tokens'),
      Dataset('routellm_gsm8k', dict(name='routing_files', format='routellm',
                                     files=str(SHARED / 'routellm' / 'gsm8k'),
                                     pool=pool('routellm.yaml')),
              'RouteLLM GSM8K, GPT-4 vs Mixtral; output tokens counted from the responses'),
      Dataset('routerdc', dict(name='routing_files', format='routerdc',
                               files=','.join(str(p) for p in rdc),
                               pool=pool('routerdc7.yaml')),
              'RouterDC, 7 open ~7B models on MMLU, GSM8K, CMMLU, ARC-C, HumanEval; '
              'assumed prices (configs/pools/routerdc7.yaml)'),
  ]


def _missing_files(ds: Dataset) -> list[str]:
  data = ds.data
  wanted = [data['manual_dir']] if data.get('name') == 'routerbench' else data['files'].split(',')
  return [p for p in wanted if not os.path.exists(p)]


def available_defaults() -> list[Dataset]:
  """The default data sets whose files are here (a line on stderr for each missing one)."""
  found = []
  for ds in default_datasets():
    missing = _missing_files(ds)
    if missing:
      print(f'suite: skipping {ds.name}: {missing[0]} not found (expected ../shared/data '
            'beside the repository, or ENTROROUTER_SHARED_DATA)', file=sys.stderr)
    else:
      found.append(ds)
  return found


def parse_datasets(spec: str, pools: str = '') -> list[Dataset]:
  """--datasets=NAME=FORMAT:PATH[,...] (and --pools=NAME=FILE[,...]) -> data sets.

  The item `default` stands for the default data sets (`available_defaults`), so
  `--datasets=default,mine=long:mine.csv` adds a file to them.
  """
  pool_of = {}
  for item in filter(None, (p.strip() for p in pools.split(','))):
    name, sep, path = item.partition('=')
    if not sep or not name or not path:
      raise ValueError(f'--pools item {item!r}: expected NAME=POOL.yaml')
    pool_of[name] = os.path.expanduser(path)
  out = []
  for item in filter(None, (p.strip() for p in spec.split(','))):
    if item == 'default':
      out += [d for d in available_defaults() if d.name not in {o.name for o in out}]
      continue
    name, sep, rest = item.partition('=')
    fmt, sep2, path = rest.partition(':')
    if not (sep and sep2 and name and path):
      raise ValueError(f'--datasets item {item!r}: expected NAME=FORMAT:PATH '
                       f'(FORMAT one of {list(FORMATS)}; several paths joined with "+")')
    if fmt not in FORMATS:
      raise ValueError(f'--datasets item {item!r}: format {fmt!r}; expected one of {list(FORMATS)}')
    files = [os.path.expanduser(p) for p in path.split('+')]
    missing = [p for p in files if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f'--datasets item {item!r}: {missing[0]} does not exist')
    if fmt == 'routerbench':
      data = dict(name='routerbench', manual_dir=files[0])
    else:
      data = dict(name='routing_files', format=fmt, files=','.join(files),
                  pool=pool_of.get(name, ''))
    if name in (d.name for d in out):
      raise ValueError(f'--datasets: the name {name!r} is given twice')
    out.append(Dataset(name, data, f'{fmt}: {path}'))
  unknown = set(pool_of) - {d.name for d in out}
  if unknown:
    raise ValueError(f'--pools names {sorted(unknown)} match no --datasets entry')
  return out


def chosen_datasets(spec: str, pools: str = '') -> list[Dataset]:
  """The data sets a command runs on: --datasets (with --pools) where given, else every
  default data set found; ValueError / FileNotFoundError say what is wrong."""
  if spec:
    return parse_datasets(spec, pools or '')
  if pools:
    raise ValueError('--pools names pool files for --datasets entries; give --datasets too')
  found = available_defaults()
  if not found:
    raise FileNotFoundError(f'no data set found under {SHARED}; give '
                            '--datasets=NAME=FORMAT:PATH')
  return found
