"""Writes a routing data set that no default run uses as one long file (one row per query
and model), for checking that a new data set runs with the defaults:

  python benchmarks/long_file.py --out=/tmp/routerdc_ood.csv
  python -m entrorouter_jax.online --workdir=/tmp/online_ood --datasets=ood=long:/tmp/routerdc_ood.csv

The queries are RouterDC's out-of-distribution sets (../shared/data/routerdc7: MATH
prealgebra, ARC-Easy train and test, C-Eval, JavaScript, MBPP; ../shared's SOURCE.md gives
their origin), which neither the quality suite nor the replay simulator reads by default.
The file has columns id, query, task, model, score, cost: the cost is RouterDC's assumed
price (configs/pools/routerdc7.yaml) times the reader's token estimate (characters / 4 in,
256 out). It has no split column, so the reader splits it by a seeded hash of the id, as it
would any user's file. The file is written where --out says, never into the repository.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import json
import pathlib
import sys

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared' / 'data' / 'routerdc7'
SETS = ('MATH_prealgebra', 'arc_easy_train', 'arc_easy_test', 'ceval', 'javascript', 'mbpp')
OUTPUT_TOKENS = 256


def prices() -> dict:
  pool = yaml.safe_load((REPO / 'configs' / 'pools' / 'routerdc7.yaml').read_text())
  return {m['name']: (float(m['price_in']), float(m['price_out'])) for m in pool}


def rows(source: pathlib.Path):
  """(id, query, task, model, score, cost) per query and model of every set in SETS."""
  price = prices()
  for name in SETS:
    path = source / f'{name}.json'
    task = name.replace('_train', '').replace('_test', '')
    for i, item in enumerate(json.loads(path.read_text(encoding='utf-8'))):
      scores = item['scores']
      if isinstance(scores, str):            # some RouterDC files keep the dict as a string
        scores = ast.literal_eval(scores)
      query = item['question']
      digest = hashlib.sha1(query.encode('utf-8')).hexdigest()[:8]
      tokens_in = len(query) / 4
      for model, score in scores.items():
        p_in, p_out = price[model]
        cost = (tokens_in * p_in + OUTPUT_TOKENS * p_out) / 1e6
        yield f'{name}-{i}-{digest}', query, task, model, float(score), cost


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='the long CSV to write')
  parser.add_argument('--source', default=str(SHARED), help='RouterDC split2_model7 folder')
  args = parser.parse_args(argv)
  source = pathlib.Path(args.source)
  missing = [s for s in SETS if not (source / f'{s}.json').exists()]
  if missing:
    print(f'error: {source} lacks {", ".join(f"{s}.json" for s in missing)} '
          '(../shared/data/routerdc7 holds them)', file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  n = 0
  with out.open('w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['id', 'query', 'task', 'model', 'score', 'cost'])
    for row in rows(source):
      writer.writerow(row)
      n += 1
  print(f'wrote {n} rows ({n // 7} queries x 7 models) to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
