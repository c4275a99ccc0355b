"""Route queries with a trained router.

  python -m entrorouter_jax.route --workdir=DIR "How do I reverse a list in Python?"
  python -m entrorouter_jax.route --workdir=DIR --input=queries.jsonl --output=routes.jsonl
  python -m entrorouter_jax.route --workdir=DIR --explore=0.1 --seed=7 "How do I sort a dict?"

One query prints one JSON object: the chosen model, its probability and the
whole distribution. A file of JSON lines ({"query": ...} or {"prompt": ...},
optional "id") is routed in batches with a progress bar, one JSON line out per
line in.

Knobs along the cost/quality curve, at routing time:
  --cost_weight=L  lambda: for a router with the utility head (the default) the
                   route is argmax s - L c_bar, so one checkpoint moves along its
                   whole cost/quality curve; also for a lambda-conditioned router
  --threshold=T    in (0, 1]: the cheapest model whose probability is at least
                   T x the top probability (1 = the router's own choice)
  --fallback_model=NAME --min_confidence=P: when the top probability is below P,
                   route to NAME instead (say, the strongest model).
Without --cost_weight or --threshold, the router routes at the cost weight (or
threshold) that `python -m entrorouter_jax.calibrate` stored in
DIR/calibration.json, else at its trained cost weight.

Exploration (the deployed policy whose logs become feedback data):
  --explore=EPS    in [0, 1]: draw the model from (1 - EPS) pi(.|x) + EPS / K' over
                   the served models instead of taking the router's choice; each
                   result adds "propensity" (the drawn model's probability under
                   that mixture, what a feedback log records) and "explore"
                   (EPS); "probability" and "distribution" stay pi's. A router
                   with a threshold rule samples from pi too, so --threshold and
                   --fallback_model do not combine with --explore.
  --served=A,B     the models that may be drawn (default: all; needs --explore)
  --seed=N         the draws' seed (default 0): the same seed, the same choices
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Optional

import numpy as np
from absl import app, flags

from entrorouter_jax import router as router_lib
from entrorouter_jax import strict_json

FLAGS = flags.FLAGS


def route_records(router: router_lib.Router, queries, cost_weight=None, threshold=None,
                  fallback_model: Optional[str] = None, min_confidence: float = 0.0,
                  explore: Optional[float] = None, seed=0, served=None):
  """One result dict per query. cost_weight / threshold None: the router's
  defaults (DIR/calibration.json's where `calibrate` wrote one). With `explore`
  (a rate in [0, 1]) the model is drawn by `Router.sample` (`seed`: an int or a
  numpy Generator; `served`: model names) and each result adds its "propensity"
  and "explore"."""
  if explore is not None:
    return sample_records(router, queries, explore, cost_weight, seed, served, threshold,
                          fallback_model)
  if served is not None:
    raise router_lib.RouterError('--served needs --explore: it limits the models drawn')
  threshold = router.default_threshold if threshold is None else threshold
  if cost_weight is not None:
    cost_weight = router.check_cost_weight(cost_weight, '--cost_weight')
  fallback = None
  if fallback_model is not None:
    if fallback_model not in router.model_names:
      raise router_lib.RouterError(f'--fallback_model={fallback_model!r} is not in the pool; '
                                   f'expected one of {router.model_names}')
    fallback = router.model_names.index(fallback_model)
  probs = router.probs(queries, cost_weight)
  choice, fell_back = router_lib.choose(probs, router.model_costs, threshold, fallback,
                                       min_confidence)
  return [{'model': router.model_names[c], 'probability': float(p[c]),
           'fallback': bool(f),
           'distribution': {name: float(v) for name, v in zip(router.model_names, p)}}
          for c, p, f in zip(choice, probs, fell_back)]


def sample_records(router: router_lib.Router, queries, explore, cost_weight=None, seed=0,
                   served=None, threshold=None, fallback_model: Optional[str] = None):
  """route_records with exploration: one result dict per query, its model drawn from the
  exploring policy (Router.sample) with that model's "propensity" and the rate "explore"."""
  for flag, value in (('--threshold', threshold), ('--fallback_model', fallback_model)):
    if value is not None:
      raise router_lib.RouterError(f'{flag}={value} does not combine with --explore: an '
                                   'exploring router samples from pi, not by the routing rule')
  explore = router_lib.check_explore(explore, '--explore')
  if cost_weight is not None:
    cost_weight = router.check_cost_weight(cost_weight, '--cost_weight')
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(
      router_lib.check_seed(seed, '--seed'))
  mask = router.served_mask(served, '--served')
  probs = router.probs(queries, cost_weight)
  dist = router_lib.explore_distribution(probs, mask, explore)
  choice = router_lib.draw(dist, rng)
  return [{'model': router.model_names[c], 'probability': float(p[c]), 'fallback': False,
           'distribution': {name: float(v) for name, v in zip(router.model_names, p)},
           'propensity': float(d[c]), 'explore': explore}
          for c, p, d in zip(choice, probs, dist)]


def read_queries(path):
  """(ids, queries) from a JSON-lines file (a pathlib or epath path); bad lines
  raise with their line number.

  Lines are strict JSON in UTF-8 (`strict_json`): bytes that are not UTF-8,
  NaN/Infinity, numbers out of float range and escapes that decode to a lone
  surrogate ("\\ud800") raise RouterError naming the line (and the field), here
  rather than in the tokenizer later.
  """
  ids, queries = [], []
  try:
    records = strict_json.read_jsonl(path)
  except strict_json.JsonError as e:
    raise router_lib.RouterError(e.message) from None
  for lineno, record in records:
    if not isinstance(record, dict):
      raise router_lib.RouterError(f'{path}:{lineno}: expected a JSON object with a '
                                   f'"query" field, got {type(record).__name__}')
    text = record.get('query', record.get('prompt'))
    if not isinstance(text, str) or not text.strip():
      raise router_lib.RouterError(f'{path}:{lineno}: "query" is missing or empty; expected '
                                   'a non-empty string in "query" (or "prompt")')
    ids.append(record.get('id', lineno))
    queries.append(text)
  return ids, queries


def route_file(router, input_path, output_path, batch_size=256, **knobs) -> int:
  """Routes a JSON-lines file of queries in batches into `output_path`, one line per
  query; with knobs['explore'] the batches draw on one Generator seeded by
  knobs['seed'], so the choices do not depend on the batch size."""
  from tqdm.auto import tqdm
  if knobs.get('explore') is not None:
    knobs = dict(knobs, seed=np.random.default_rng(
        router_lib.check_seed(knobs.get('seed', 0), '--seed')))
  ids, queries = read_queries(pathlib.Path(input_path))
  output_path = pathlib.Path(output_path)
  output_path.parent.mkdir(parents=True, exist_ok=True)
  with output_path.open('w', encoding='utf-8') as out, \
       tqdm(total=len(queries), unit='query') as bar:
    for start in range(0, len(queries), batch_size):
      chunk = queries[start:start + batch_size]
      for i, result in zip(ids[start:start + batch_size], route_records(router, chunk, **knobs)):
        out.write(json.dumps({'id': i, **result}) + '\n')
      bar.update(len(chunk))
  return len(queries)


def main(argv):
  from entrorouter_jax import logs
  logs.show_progress_logs()
  queries = argv[1:]
  if bool(queries) == bool(FLAGS.input):
    print('error: give either one query as an argument or --input=FILE.jsonl', file=sys.stderr)
    sys.exit(2)
  knobs = dict(cost_weight=FLAGS.cost_weight, threshold=FLAGS.threshold,
               fallback_model=FLAGS.fallback_model, min_confidence=FLAGS.min_confidence)
  if FLAGS.explore is not None or FLAGS.served is not None:
    knobs.update(explore=FLAGS.explore, seed=FLAGS.seed, served=FLAGS.served)
  try:
    router = router_lib.load_router(FLAGS.workdir)
    if FLAGS.input:
      if not FLAGS.output:
        raise router_lib.RouterError('--input needs --output=FILE.jsonl')
      n = route_file(router, FLAGS.input, FLAGS.output, **knobs)
      print(f'routed {n} queries to {FLAGS.output}', file=sys.stderr)
    else:
      for result in route_records(router, [' '.join(queries)], **knobs):
        print(json.dumps(result, indent=2))
  except (router_lib.RouterError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Workdir of a finished training run.', required=True)
  flags.DEFINE_string('input', None, 'JSON-lines file of queries to route.')
  flags.DEFINE_string('output', None, 'Where --input\'s routes go (JSON lines).')
  flags.DEFINE_float('cost_weight', None, 'lambda (utility-head or lambda-conditioned routers).')
  flags.DEFINE_float('threshold', None, 'Cheapest model with pi >= threshold x max pi '
                     '(default: the calibrated one, else 1).')
  flags.DEFINE_string('fallback_model', None, 'Model used when the router is unsure.')
  flags.DEFINE_float('min_confidence', 0.0, 'Below this top probability, use the fallback.')
  flags.DEFINE_float('explore', None, 'In [0, 1]: draw the model from (1 - EPS) pi + EPS / K\' '
                     'over the served models and print its propensity.')
  flags.DEFINE_list('served', None, 'With --explore: the models that may be drawn.')
  flags.DEFINE_integer('seed', 0, 'With --explore: the seed of the draws.')
  app.run(main)
