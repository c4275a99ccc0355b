"""Adds a model to a trained router without retraining it, or removes one.

  python -m entrorouter_jax.add_model --workdir=DIR --model=NAME --labels=FILE \\
      --price_in=P --price_out=Q --out=NEW [--pool=POOL.yaml]
  python -m entrorouter_jax.add_model --workdir=DIR --remove=NAME --out=NEW

NEW is a copy of DIR (its checkpoints untouched) that routes over DIR's models
plus NAME (or minus NAME): `route`, `serve`, `calibrate` and `evaluate` take it
as any router workdir (router.json's model_names include NAME; config.json's
data.models lists the routed models, so `evaluate` reads NAME's outcomes from the
data). What is added is in NEW/added_models.json and NEW/stage0.pkl; how the
added model is estimated is in entrorouter_jax/added_models.py.

The labels FILE (CSV with a header, or JSON lines): one line per query NAME
answered, with `query` (or `prompt`) and `score` in [0, 1], and optionally its
`cost` in dollars or its token counts `input_tokens`, `output_tokens`. A
line's cost is `cost` where given, else its tokens x P, Q (dollars per 1M
tokens); a missing input count is ceil(len(query) / 4), a missing output count
the pool's typical one at that query: the median over the pool models with a
price in --pool (or the router's data.pool) of the output tokens their expected
cost there implies, else the readers' assumed 256 (data.read_options.
assumed_output_tokens). From these costs NAME's expected normalised cost c_bar
(in the router's c_ref) follows the pool's cost profile
(added_models.cost_level).

Stage 0's training table gains NAME's column: observed on the labelled queries
(a query of the training table is that row; another is a new row, on which the
other models are unobserved and cost their kNN c_bar), unobserved elsewhere,
so the kNN's p_hat(NAME|x) is the mean label shrunk as usual and its c_bar a
neighbourhood mean. Removing a model hides its column: routing renormalises
over the rest. Only routers with the utility head (model.head=utility, the
default recipe) take either. Errors (a name already routed or unknown, a bad
labels line, a missing price) print one `error: ...` line and exit with status 2.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
from typing import Optional

import numpy as np
from absl import app, flags

from entrorouter_jax import paths, strict_json
from entrorouter_jax import workdir as workdir_lib
from entrorouter_jax.data.dataset import DataError
from entrorouter_jax.workdir import RouterError

FLAGS = flags.FLAGS
CHARS_PER_TOKEN = 4          # as the table readers: input tokens ceil(len(query) / 4)
ASSUMED_OUTPUT_TOKENS = 256  # the readers' default where nothing says more
# A labelled query is a training row of Stage 0 where their features' cosine is this close to 1.
SAME_QUERY = 1.0 - 1e-5


class AddModelError(RouterError):
  """A request add_model cannot carry out (bad flags, names, labels)."""


# ================================================================ labels ===
@dataclasses.dataclass
class Labels:
  """The labels file: N queries NAME answered, with their scores and what they cost."""
  source: str
  lines: list                   # each query's line in the file
  queries: list
  scores: np.ndarray            # float64[N] in [0, 1]
  costs: np.ndarray             # float64[N] dollars, NaN where not given
  input_tokens: np.ndarray      # float64[N], NaN where not given
  output_tokens: np.ndarray     # float64[N], NaN where not given


def _number(value, where: str, field: str, expected: str, low: float = 0.0,
            high: float = math.inf, required: bool = False) -> float:
  """One field's value as a float in [low, high] (NaN where empty and not required);
  AddModelError naming where (file:line), the field, the value and `expected`."""
  text = value.strip() if isinstance(value, str) else value
  if text is None or (isinstance(text, str) and text == ''):
    if required:
      raise AddModelError(f'{where}: field {field} is missing; expected {expected}')
    return math.nan
  number = math.nan
  if isinstance(text, bool):
    number = float(text)
  elif isinstance(text, (int, float)):
    number = float(text)
  elif isinstance(text, str):
    lowered = text.lower()
    if lowered in ('true', 'false'):
      number = float(lowered == 'true')
    else:
      try:
        number = float(text)
      except ValueError:
        number = math.nan
  if not (math.isfinite(number) and low <= number <= high):
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + '...'
    raise AddModelError(f'{where}: field {field} is {shown}; expected {expected}')
  return number


def _label_records(path: pathlib.Path):
  """(line number, {field: value}) for each line of a CSV (header first) or JSON-lines file."""
  suffix = path.suffix.lower()
  if suffix == '.csv':
    try:
      with path.open(newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ('score',) if c not in header]
        if not ({'query', 'prompt'} & set(header)):
          missing.insert(0, 'query')
        if missing:
          raise AddModelError(f'{path}:1: the header has no column {missing[0]}; expected '
                              'query (or prompt), score[, cost, input_tokens, output_tokens]')
        for row in reader:
          yield reader.line_num, row
    except UnicodeDecodeError:
      try:
        strict_json.check_utf8_file(path)
      except strict_json.JsonError as e:
        raise AddModelError(str(e)) from None
      raise
  elif suffix in ('.jsonl', '.json'):
    try:
      for lineno, record in strict_json.iter_jsonl(path):
        if not isinstance(record, dict):
          raise AddModelError(f'{path}:{lineno}: a JSON {type(record).__name__}; expected one '
                              'object per line with "query" and "score"')
        yield lineno, record
    except strict_json.JsonError as e:
      raise AddModelError(e.message) from None
  else:
    raise AddModelError(f'--labels={path}: suffix {suffix!r}; expected .csv or .jsonl')


def read_labels(path) -> Labels:
  """The labels file (module docstring) as `Labels`; AddModelError naming file:line and the
  field for a missing or empty query, a score outside [0, 1] or not a number, a negative
  cost or token count, a query labelled twice, or no line at all."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise AddModelError(f'--labels={path}: no such file; expected a CSV or JSON-lines file '
                        'with query, score[, cost, input_tokens, output_tokens]')
  lines, queries, first = [], [], {}
  values = {k: [] for k in ('score', 'cost', 'input_tokens', 'output_tokens')}
  for lineno, record in _label_records(path):
    where = f'{path}:{lineno}'
    field = 'query' if 'query' in record else 'prompt'
    query = record.get(field)
    if not isinstance(query, str) or not query.strip():
      raise AddModelError(f'{where}: field {field} is missing or empty; expected the '
                          'non-empty text of the query')
    if query in first:
      raise AddModelError(f'{where}: field {field} repeats line {first[query]}; expected one '
                          'label per query')
    first[query] = lineno
    values['score'].append(_number(record.get('score'), where, 'score', 'a number in [0, 1]',
                                   high=1.0, required=True))
    values['cost'].append(_number(record.get('cost'), where, 'cost',
                                  'a cost in dollars >= 0 (or empty)'))
    for name in ('input_tokens', 'output_tokens'):
      values[name].append(_number(record.get(name), where, name,
                                  'a token count >= 0 (or empty)'))
    lines.append(lineno)
    queries.append(query)
  if not queries:
    raise AddModelError(f'{path}: no labelled queries; expected one line per query the model '
                        'answered, with query and score')
  arrays = {k: np.asarray(v, np.float64) for k, v in values.items()}
  return Labels(source=str(path), lines=lines, queries=queries, scores=arrays['score'],
                costs=arrays['cost'], input_tokens=arrays['input_tokens'],
                output_tokens=arrays['output_tokens'])


def label_costs(labels: Labels, price_in: float, price_out: float,
                typical_output=None) -> tuple[np.ndarray, str]:
  """(dollars float64[N], how they were found): `cost` where given, else (input tokens x
  price_in + output tokens x price_out) / 1e6 with the given counts, input ceil(len(query)
  / 4) and output `typical_output` (float[N], the pool's; default ASSUMED_OUTPUT_TOKENS)
  where a count is missing."""
  n = len(labels.queries)
  est_in = np.ceil(np.array([len(q) for q in labels.queries], np.float64) / CHARS_PER_TOKEN)
  typical = (np.full(n, float(ASSUMED_OUTPUT_TOKENS)) if typical_output is None
             else np.asarray(typical_output, np.float64))
  tin = np.where(np.isnan(labels.input_tokens), est_in, labels.input_tokens)
  tout = np.where(np.isnan(labels.output_tokens), typical, labels.output_tokens)
  priced = (tin * price_in + tout * price_out) / 1e6
  given = ~np.isnan(labels.costs)
  counted = ~np.isnan(labels.input_tokens) | ~np.isnan(labels.output_tokens)
  how = {'cost': int(given.sum()), 'tokens x prices': int((~given & counted).sum()),
         'estimated tokens x prices': int((~given & ~counted).sum())}
  return (np.where(given, labels.costs, priced),
          ', '.join(f'{v} {k}' for k, v in how.items() if v))


def typical_output_tokens(labels: Labels, c_bar, names, c_ref: float, prices: dict):
  """float64[N] or None: per labelled query, the median over the pool models with a price
  (prices {name: ModelInfo}; c_bar float[N, K] their expected normalised cost there, names
  their K names) of the output tokens that cost implies, (c_bar c_ref 1e6 - input x
  price_in) / price_out, at least 0; None where no pool model has both prices."""
  est_in = np.ceil(np.array([len(q) for q in labels.queries], np.float64) / CHARS_PER_TOKEN)
  tin = np.where(np.isnan(labels.input_tokens), est_in, labels.input_tokens)
  implied = []
  for j, name in enumerate(names):
    info = prices.get(name)
    if info is None or not info.price_out or info.price_in is None:
      continue
    dollars = np.asarray(c_bar, np.float64)[:, j] * c_ref
    implied.append(np.maximum((dollars * 1e6 - tin * info.price_in) / info.price_out, 0.0))
  return np.median(np.stack(implied), axis=0) if implied else None


# ============================================================ the workdir ===
def base_record(workdir) -> workdir_lib.AddedModels:
  """DIR's added_models.json, or the record of a router as trained (router.json)."""
  record = workdir_lib.read_added_models(workdir)
  if record is not None:
    return record
  info = workdir_lib.read_router_info(workdir)
  return workdir_lib.AddedModels(
      network_models=list(info.model_names), network_strongest=int(info.strongest),
      columns=[{'name': n, 'cost': float(c)} for n, c in zip(info.model_names, info.model_costs)])


def check_request(workdir, out, model: Optional[str], remove: Optional[str], labels,
                  price_in, price_out) -> workdir_lib.AddedModels:
  """The flags checked before anything heavy loads; returns DIR's record. AddModelError for
  a missing or extra flag, a price that is not a number >= 0, an --out that exists, a
  NAME already routed (--model) or not routed (--remove), or a router without the utility
  head."""
  if (model is None) == (remove is None):
    raise AddModelError('give either --model=NAME (with --labels, --price_in, --price_out) '
                        'or --remove=NAME')
  if not out:
    raise AddModelError('--out is missing; expected the directory of the new router')
  if paths.is_remote(workdir) or paths.is_remote(out):
    raise AddModelError(f'--workdir={workdir} --out={out}: expected local directories (copy a '
                        'remote workdir here first)')
  workdir = pathlib.Path(workdir)
  missing = workdir_lib.missing_run_files(workdir)
  if missing:
    raise AddModelError(f'{workdir}: {missing[0].name} is missing; expected the workdir of a '
                        'finished training run (python -m entrorouter_jax.train --workdir=...)')
  out = pathlib.Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise AddModelError(f'--out={out} exists; expected a new (or empty) directory')
  config = workdir_lib.read_config(workdir)
  if config.model.get('head', 'softmax') != 'utility':
    raise AddModelError(f'{workdir}: the router has model.head={config.model.get("head")!r}; '
                        'adding or removing models needs model.head=utility (the default '
                        'recipe), whose s(x, m) - lambda c_bar(x, m) takes a column per model')
  record = base_record(workdir)
  names = record.model_names
  if remove is not None:
    if remove not in names:
      raise AddModelError(f'--remove={remove!r} is not routed by {workdir}; expected one of '
                          f'{names}')
    if len(names) == 1:
      raise AddModelError(f'--remove={remove!r} is the only model {workdir} routes; expected '
                          'at least one model to remain')
    return record
  if not model.strip() or ',' in model:
    raise AddModelError(f'--model={model!r}; expected a non-empty model name without commas '
                        '(data.models lists names comma-separated)')
  if model in names:
    raise AddModelError(f'--model={model!r} is already routed by {workdir}; expected a new name '
                        '(--remove it first to replace it)')
  for flag, value in (('--labels', labels), ('--price_in', price_in),
                      ('--price_out', price_out)):
    if value is None:
      what = ('the labels file (query, score per line)' if flag == '--labels' else
              f'the model\'s price in dollars per 1M {flag[8:]}put tokens')
      raise AddModelError(f'{flag} is missing; --model needs it: expected {what}')
  for flag, value in (('--price_in', price_in), ('--price_out', price_out)):
    if not math.isfinite(value) or value < 0:
      raise AddModelError(f'{flag}={value}; expected a price >= 0 in dollars per 1M tokens')
  return record


def _copy_workdir(workdir, out) -> pathlib.Path:
  """A copy of DIR (all but eval/, which describes DIR's router) beside `out`, to be
  renamed onto it once complete (`_finish`)."""
  out = pathlib.Path(out).absolute()
  tmp = out.with_name(f'{out.name}.tmp{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(workdir, tmp, ignore=shutil.ignore_patterns('eval', '*.tmp[0-9]*'))
  return tmp


def _finish(tmp: pathlib.Path, out, record, info, config, stage0=None) -> None:
  """Writes added_models.json, router.json (the routed models), config.json (data.models
  the same) and stage0.pkl into the copy, then moves it onto `out`."""
  workdir_lib.write_added_models(tmp, record)
  workdir_lib.write_router_info(tmp, info)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.models = ','.join(record.model_names)
  (tmp / workdir_lib.CONFIG).write_text(config.to_json_best_effort(indent=2))
  if stage0 is not None:
    workdir_lib.write_stage0(tmp, stage0)
  out = pathlib.Path(out)
  if out.is_dir():
    out.rmdir()   # empty (check_request)
  os.replace(tmp, out)


def routed_info(workdir, record, outcomes, mask) -> workdir_lib.RouterInfo:
  """DIR's router.json with the record's routed models, their strongest and costs."""
  from entrorouter_jax import added_models
  info = workdir_lib.read_router_info(workdir)
  return dataclasses.replace(
      info, model_names=record.model_names,
      strongest=added_models.strongest_visible(record, outcomes, mask),
      model_costs=[float(record.columns[i]['cost']) for i in record.visible])


def remove_model(workdir, out, name: str) -> dict:
  """Writes NEW = DIR without `name` (its column hidden); returns a summary dict."""
  record = check_request(workdir, out, None, name, None, None, None)
  column = record.visible[record.model_names.index(name)]
  record.removed = sorted(set(record.removed) | {column})
  stage0 = workdir_lib.read_stage0(workdir)
  tmp = _copy_workdir(workdir, out)
  info = routed_info(workdir, record, stage0.train_outcomes, stage0.train_mask)
  _finish(tmp, out, record, info, workdir_lib.read_config(workdir))
  return {'removed': name, 'models': record.model_names, 'out': str(out)}


def add_model(workdir, out, name: str, labels: Labels, price_in: float, price_out: float,
              pool: Optional[str] = None) -> dict:
  """Writes NEW = DIR plus `name`, fitted on `labels` (module docstring); returns a summary
  dict of the fit."""
  from entrorouter_jax import added_models, capability, neighbours
  from entrorouter_jax import router as router_lib
  from entrorouter_jax.data import pool as pool_lib
  record = check_request(workdir, out, name, None, labels, price_in, price_out)
  router = router_lib.load_router(workdir)
  config = router.config
  visible = record.visible
  feats = router.features(labels.queries)
  tables = router.knn_table().estimates(feats)
  success, c_bar = router.scores(labels.queries, tables, feats)

  # What the labelled queries cost, in the router's unit, and the model's price level.
  pool = pool or config.data.get('pool', '')
  prices = pool_lib.prices(pool) if pool else {}
  typical = typical_output_tokens(labels, c_bar, router.model_names, router.c_ref, prices)
  if typical is None:
    typical = np.full(len(labels.queries), float(config.data.read_options.get(
        'assumed_output_tokens', ASSUMED_OUTPUT_TOKENS)))
  dollars, cost_source = label_costs(labels, price_in, price_out, typical)
  c_hat = dollars / router.c_ref
  pool_costs = np.asarray([record.columns[i]['cost'] for i in visible], np.float64)
  level = added_models.cost_level(c_hat, added_models.cost_profile(c_bar, pool_costs))

  prior = np.full(len(visible), 1.0 / len(visible))   # the pool's average model
  fit = added_models.fit_success(success, feats, labels.scores, prior)
  column = len(record.columns)
  model = added_models.SuccessModel(
      name=name, column=column, inputs=list(visible), intercept=fit['intercept'],
      pool_weights=fit['pool_weights'].tolist(), feature_weights=fit['feature_weights'].tolist(),
      info={'price_in': price_in, 'price_out': price_out, 'cost': level,
            'labels': {'file': labels.source, 'count': len(labels.queries),
                       'mean_score': float(labels.scores.mean()), 'costs': cost_source},
            'prior': {'pool_weights': prior.tolist(), 'sigma': list(fit['sigma']),
                      'log_evidence': fit['log_evidence'],
                      'evidence_grid': fit['evidence_grid']}})

  # Stage 0's training table gains the column (and the labelled queries it lacks).
  stage0 = workdir_lib.read_stage0(workdir)
  n0 = len(stage0.train_feats)
  sims = np.asarray(feats, np.float32) @ np.asarray(stage0.train_feats, np.float32).T
  nearest = np.argmax(sims, axis=1)
  row_of = np.full(len(feats), -1)
  taken = set()
  for i, j in enumerate(nearest):
    if sims[i, j] >= SAME_QUERY and j not in taken:
      row_of[i] = j
      taken.add(int(j))
  new = np.flatnonzero(row_of < 0)
  row_of[new] = n0 + np.arange(len(new))
  profile = added_models.cost_profile(np.asarray(stage0.train_cost_hat)[:, visible], pool_costs)
  column_cost = np.concatenate([level * profile, np.zeros(len(new))])
  column_cost[row_of] = c_hat
  column_y = np.zeros(n0 + len(new))
  column_y[row_of] = labels.scores
  column_mask = np.zeros(n0 + len(new), bool)
  column_mask[row_of] = True

  def grown(table, new_rows, column_values):
    return np.concatenate([np.concatenate([np.asarray(table), new_rows]),
                           column_values[:, None].astype(np.asarray(table).dtype)], axis=1)

  stage0.train_feats = np.concatenate([stage0.train_feats, np.asarray(feats, np.float32)[new]])
  stage0.train_outcomes = grown(stage0.train_outcomes, np.zeros((len(new), column)), column_y)
  stage0.train_mask = grown(stage0.train_mask, np.zeros((len(new), column), bool), column_mask)
  stage0.train_cost_hat = grown(stage0.train_cost_hat, np.asarray(tables[1])[new], column_cost)
  stage0.train_tasks = list(stage0.train_tasks or [''] * n0) + [''] * len(new)

  anchor = config.anchor
  knn = capability.KnnTable(stage0.train_feats, stage0.train_outcomes, stage0.train_mask,
                            stage0.train_cost_hat, stage0.train_tasks, k=anchor.k,
                            alpha=anchor.alpha, prior=anchor.prior,
                            **neighbours.search_settings(anchor))
  for split, table in stage0.tables.items():
    if split == 'train':   # leave-one-out, as Stage 0 computed it
      p, c = (a[:n0, column] for a in knn.leave_one_out())
    else:
      p, c = (a[:, column] for a in knn.estimates(stage0.features[split]))
    table['p_hat'] = np.concatenate([table['p_hat'], p[:, None]], axis=1).astype(np.float32)
    table['c_bar'] = np.concatenate([table['c_bar'], c[:, None]], axis=1).astype(np.float32)

  record.columns.append({'name': name, 'cost': level})
  record.added.append(model.to_dict())
  tmp = _copy_workdir(workdir, out)
  info = routed_info(workdir, record, stage0.train_outcomes, stage0.train_mask)
  _finish(tmp, out, record, info, workdir_lib.read_config(workdir), stage0)

  # How it routes the labelled queries, at the router's operating cost weight.
  s_new = model.predict(_with_inputs(success, visible, column), feats)
  c_new = knn.estimates(feats)[1][:, column]
  lam = router.default_cost_weight
  utility = np.concatenate([success, s_new[:, None]], 1) - lam * np.concatenate(
      [c_bar, c_new[:, None]], 1)
  return {'added': name, 'models': record.model_names, 'out': str(out),
          'labels': len(labels.queries), 'appended_rows': int(len(new)),
          'mean_score': float(labels.scores.mean()), 'mean_success': float(s_new.mean()),
          'cost': level, 'dollars_per_query': level * router.c_ref, 'costs': cost_source,
          'pool_weights': {router.model_names[j]: round(float(fit['pool_weights'][j]), 3)
                           for j in np.argsort(-np.abs(fit['pool_weights']))[:3]},
          'sigma': fit['sigma'], 'cost_weight': lam,
          'share_on_labels': float(np.mean(np.argmax(utility, axis=1) == len(visible)))}


def _with_inputs(success, visible, column) -> np.ndarray:
  """Every column's success float[N, column] with the routed ones (`visible`) filled in."""
  s = np.full((len(success), column), 0.5)
  s[:, visible] = success
  return s


# ================================================================ the CLI ===
def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  try:
    check_request(FLAGS.workdir, FLAGS.out, FLAGS.model, FLAGS.remove, FLAGS.labels,
                  FLAGS.price_in, FLAGS.price_out)
    if FLAGS.remove is not None:
      summary = remove_model(FLAGS.workdir, FLAGS.out, FLAGS.remove)
    else:
      labels = read_labels(FLAGS.labels)
      from entrorouter_jax import logs
      logs.show_progress_logs()
      summary = add_model(FLAGS.workdir, FLAGS.out, FLAGS.model, labels, FLAGS.price_in,
                          FLAGS.price_out, FLAGS.pool)
  except (RouterError, DataError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if 'added' in summary:
    print(f"added {summary['added']} from {summary['labels']} labels (mean score "
          f"{summary['mean_score']:.3f}; predicted {summary['mean_success']:.3f}), expected cost "
          f"{summary['cost']:.4g} x c_ref (${summary['dollars_per_query']:.4g} per query; "
          f"{summary['costs']}); largest pool weights {summary['pool_weights']}, prior sigma "
          f"{summary['sigma']}; routed "
          f"{summary['share_on_labels']:.1%} of its labelled queries at lambda = "
          f"{summary['cost_weight']:g}", file=sys.stderr)
  else:
    print(f"removed {summary['removed']}", file=sys.stderr)
  print(f"{summary['out']} routes {summary['models']}", file=sys.stderr)
  print(json.dumps(summary, indent=2, default=float))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Workdir of a trained router.', required=True)
  flags.DEFINE_string('out', None, 'Directory of the new router (must not exist).')
  flags.DEFINE_string('model', None, 'Name of the model to add.')
  flags.DEFINE_string('labels', None, 'CSV or JSON lines: query, score[, cost, input_tokens, '
                      'output_tokens] for queries the model answered.')
  flags.DEFINE_float('price_in', None, 'The added model\'s price, dollars per 1M input tokens.')
  flags.DEFINE_float('price_out', None, 'The added model\'s price, dollars per 1M output '
                     'tokens.')
  flags.DEFINE_string('pool', None, 'Pool file with the other models\' prices (default: the '
                      'router\'s data.pool), for the typical output tokens.')
  flags.DEFINE_string('remove', None, 'Name of a routed model to remove instead.')
  app.run(main)
