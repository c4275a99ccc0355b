"""Joins the server's decision log with the scores given since: a feedback log to train on.

  python -m entrorouter_jax.feedback --decisions=DIR [--scores=FILE.jsonl] --out=LOGS.csv

DIR is a server's --decisions directory: its decisions-*.jsonl lines (serving/decisions.py)
and its feedback-*.jsonl lines ({"id", "score", "time"}: what POST /v1/feedback accepted).
--scores adds JSON lines {"id", "score"[, "time"]} judged elsewhere; an id of no decision is
counted and reported, not an error. Per id the latest score wins: by "time", a --scores
line without one after every line of the server's (and, among equals, the later line).

LOGS (.csv or .jsonl, by its extension) is in the `feedback` format of
`entrorouter_jax.data.feedback` (README "Learning from feedback"), one row per routed chat
completion: id, query (the text routed on), model (the one that answered), score (empty
where no one judged it yet), cost (its dollars), propensity, cost_weight, time, policy (the
router's version). Decision lines that cannot be such a row are dropped and counted:
/v1/route calls and lines without a cost (the server never saw, or could not price, the
answer), chat lines whose status is not 200, fallbacks (answered by another model than the
chosen one, whose propensity that is), repeated ids and lines that are not JSON objects
(a line torn by a crash). A tool-call follow-up (a line with "follows": the id of the
routed request whose model made the call) is no decision of the router's: its line is
dropped, and a score given for it scores the request it follows (the conversation's
answer is that model's). One summary line on stdout says what was written and dropped.

Imports nothing of the trainer: it reads JSON lines and writes a table.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import numbers
import pathlib
import sys
from typing import Optional

from absl import app as absl_app, flags

from entrorouter_jax import strict_json

FLAGS = flags.FLAGS
COLUMNS = ('id', 'query', 'model', 'score', 'cost', 'propensity', 'cost_weight', 'time',
           'policy')
DROPS = ('route', 'follow_up', 'status', 'fallback', 'no_cost', 'repeated_id', 'malformed')
DROP_WORDS = {'route': '/v1/route calls', 'follow_up': 'tool-call follow-ups',
              'status': 'failed (status != 200)',
              'fallback': 'fallbacks', 'no_cost': 'without cost',
              'repeated_id': 'repeated ids', 'malformed': 'malformed lines'}


class FeedbackError(ValueError):
  """Input the join cannot use: the message names the file, line and field."""


@dataclasses.dataclass
class Joined:
  """What `join` made: the rows (dicts keyed by COLUMNS), the dropped decision lines by
  reason (DROPS), and the scores whose id is not a logged decision."""
  rows: list
  dropped: collections.Counter
  unknown_scores: int = 0

  @property
  def judged(self) -> int:
    return sum(r['score'] is not None for r in self.rows)

  def summary(self, out) -> str:
    """The one summary line: rows written, judged, unjudged, each drop with its count."""
    drops = ', '.join(f'{DROP_WORDS[d]} {self.dropped[d]}' for d in DROPS)
    return (f'{out}: {len(self.rows)} rows written ({self.judged} judged, '
            f'{len(self.rows) - self.judged} unjudged); dropped: {drops}; scores of unknown '
            f'ids: {self.unknown_scores}')


def _number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _lines(path: pathlib.Path, on_invalid=None):
  """(line number, value) of each non-blank line of `path` (`strict_json.iter_jsonl`); a line
  that is not strict JSON is skipped after `on_invalid(line number)`, or without it is a
  FeedbackError naming path:line."""
  report = None if on_invalid is None else (lambda lineno, _: on_invalid(lineno))
  try:
    yield from strict_json.iter_jsonl(path, report)
  except strict_json.JsonError as e:   # its message names path:line
    raise FeedbackError(f'{e.message}; expected one JSON object per line') from None
  except OSError as e:
    raise FeedbackError(f'{path}: cannot read it ({e.strerror}); expected a readable JSON-lines '
                        'file') from None


def read_decisions(directory: pathlib.Path, dropped: collections.Counter,
                   logged: set, follows: Optional[dict] = None) -> list[dict]:
  """The rows (score None) of DIR's decisions-*.jsonl, in file and line order; the other
  lines are counted in `dropped` by reason, every decision's id, kept or dropped, is
  added to `logged`, and each follow-up's id maps to the id it follows in `follows`.
  FeedbackError for a line missing a field a row needs (naming file:line and field)."""
  rows, seen = [], set()
  for path in sorted(directory.glob('decisions-*.jsonl')):

    def malformed(lineno, path=path):
      dropped['malformed'] += 1
      print(f'warning: {path}:{lineno}: not a decision line (a JSON object with a string '
            '"id"); skipped', file=sys.stderr)

    for lineno, line in _lines(path, on_invalid=malformed):
      if not isinstance(line, dict) or not isinstance(line.get('id'), str):
        malformed(lineno)
        continue
      logged.add(line['id'])
      where = f'{path}:{lineno}'
      if line['id'] in seen:
        dropped['repeated_id'] += 1
        continue
      seen.add(line['id'])
      if line.get('endpoint') != 'chat':
        dropped['route'] += 1
      elif isinstance(line.get('follows'), str):
        dropped['follow_up'] += 1
        if follows is not None:
          follows[line['id']] = line['follows']
      elif line.get('status') != 200:
        dropped['status'] += 1
      elif line.get('answered_by') != line.get('model'):
        dropped['fallback'] += 1
      elif not _number(line.get('cost')) or line['cost'] < 0:
        dropped['no_cost'] += 1
      else:
        rows.append(_row(line, where))
  return rows


def _row(line: dict, where: str) -> dict:
  """The feedback row of one kept chat decision line (score None)."""
  for field, ok, expected in (
      ('text', lambda v: isinstance(v, str) and v.strip(), 'the text routed on'),
      ('model', lambda v: isinstance(v, str) and v, 'a model name'),
      ('propensity', lambda v: _number(v) and 0 < v <= 1, 'a number in (0, 1]'),
      ('cost_weight', lambda v: v is None or (_number(v) and v >= 0), 'a number >= 0 or null'),
      ('time', lambda v: v is None or _number(v), 'seconds since the epoch or null'),
      ('version', lambda v: v is None or isinstance(v, str), 'a string or null')):
    if not ok(line.get(field)):
      raise FeedbackError(f'{where}: {field} is {line.get(field)!r}; expected {expected}')
  return {'id': line['id'], 'query': line['text'], 'model': line['model'], 'score': None,
          'cost': float(line['cost']), 'propensity': float(line['propensity']),
          'cost_weight': line.get('cost_weight'), 'time': line.get('time'),
          'policy': line.get('version') or ''}


def read_scores(path: pathlib.Path, server: bool) -> list[tuple[str, float, Optional[float]]]:
  """(id, score, time or None) of each line of a scores file. A server's feedback file
  skips lines that are not JSON (a torn line, warned); FeedbackError naming file:line and
  field for a line without a string id, a score in [0, 1] or (if given) a numeric time."""
  out = []
  torn = (lambda lineno: print(f'warning: {path}:{lineno}: not JSON; skipped', file=sys.stderr)
          ) if server else None
  for lineno, line in _lines(path, on_invalid=torn):
    where = f'{path}:{lineno}'
    if not isinstance(line, dict):
      raise FeedbackError(f'{where}: a JSON {type(line).__name__}; expected an object '
                          '{"id", "score"[, "time"]}')
    if not isinstance(line.get('id'), str) or not line['id']:
      raise FeedbackError(f'{where}: id is {line.get("id")!r}; expected a request id string')
    score = line.get('score')
    if not _number(score) or not 0 <= score <= 1:
      raise FeedbackError(f'{where}: score is {score!r}; expected a number in [0, 1]')
    when = line.get('time')
    if when is not None and not _number(when):
      raise FeedbackError(f'{where}: time is {when!r}; expected seconds since the epoch, or '
                          'no time')
    out.append((line['id'], float(score), None if when is None else float(when)))
  return out


def join(directory, scores: Optional[str] = None) -> Joined:
  """The decision rows of `directory` with their latest scores (see the module doc)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FeedbackError(f'--decisions={directory}: not a directory; expected a server\'s '
                        '--decisions directory')
  dropped = collections.Counter()
  logged = set()   # kept or dropped alike: a score of a dropped line is not unknown
  follows = {}   # a follow-up's id -> the id of the decision it follows
  rows = read_decisions(directory, dropped, logged, follows)
  by_id = {r['id']: r for r in rows}
  given = []   # (order key, id, score): the greatest key per id wins
  for path in sorted(directory.glob('feedback-*.jsonl')):
    given += [((t if t is not None else -math.inf, len(given) + i), i_d, s)
              for i, (i_d, s, t) in enumerate(read_scores(path, server=True))]
  if scores:
    path = pathlib.Path(scores)
    if not path.is_file():
      raise FeedbackError(f'--scores={scores}: no such file; expected a JSON-lines file of '
                          '{"id", "score"[, "time"]}')
    given += [((t if t is not None else math.inf, len(given) + i), i_d, s)
              for i, (i_d, s, t) in enumerate(read_scores(path, server=False))]
  unknown, latest = 0, {}
  for key, request_id, score in given:
    if request_id not in logged:
      unknown += 1
      continue
    request_id = follows.get(request_id, request_id)
    if request_id not in logged:
      unknown += 1
    elif request_id not in latest or key >= latest[request_id][0]:
      latest[request_id] = (key, score)
  for request_id, (_, score) in latest.items():
    if request_id in by_id:
      by_id[request_id]['score'] = score
  return Joined(rows, dropped, unknown)


def write(rows: list, out) -> None:
  """Writes `rows` to `out` (.csv: empty cells for None; .jsonl: null); returns nothing."""
  out = pathlib.Path(out)
  if out.suffix.lower() not in ('.csv', '.jsonl'):
    raise FeedbackError(f'--out={out}: unsupported extension {out.suffix!r}; expected .csv or '
                        '.jsonl')
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.suffix.lower() == '.jsonl':
    with out.open('w', encoding='utf-8') as f:
      for r in rows:
        f.write(json.dumps({c: r[c] for c in COLUMNS}, ensure_ascii=False, allow_nan=False)
                + '\n')
    return
  with out.open('w', encoding='utf-8', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    for r in rows:
      writer.writerow(['' if r[c] is None else repr(r[c]) if isinstance(r[c], float) else r[c]
                       for c in COLUMNS])


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  try:
    joined = join(FLAGS.decisions, FLAGS.scores)
    if not joined.rows:
      raise FeedbackError(f'--decisions={FLAGS.decisions}: no decision line makes a row; '
                          f'expected routed chat completions answered by the chosen model '
                          f'({joined.summary(FLAGS.out)})')
    write(joined.rows, FLAGS.out)
  except (FeedbackError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(joined.summary(FLAGS.out))


if __name__ == '__main__':
  flags.DEFINE_string('decisions', None, 'A server\'s --decisions directory.', required=True)
  flags.DEFINE_string('scores', None, 'JSON lines {"id", "score"[, "time"]} judged elsewhere.')
  flags.DEFINE_string('out', None, 'The feedback log to write (.csv or .jsonl).', required=True)
  absl_app.run(main)
