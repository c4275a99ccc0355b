"""The quality suite's Markdown: per data set, summary and ablation tables (suite.md),
and the README section between the suite markers."""

from __future__ import annotations

import pathlib
from typing import Optional


def fmt_ci(ci) -> str:
  return f'[{ci[0]:.4f}, {ci[1]:.4f}]'


def dataset_table(name: str, entry: dict, info: dict) -> list[str]:
  lines = [f'### {name}', '', f"{info.get('about', '')}. {info['train']} train / {info['test']} "
           f"test queries, {info['models']} models, seeds {info['seeds']}; "
           f"{info['seconds'] / 60:.1f} min.", '',
           '| method | AIQ (mean) | 95% CI | per seed | best point saving >= 48.25%: retained |',
           '|---|---:|---|---|---:|']
  order = sorted((n for n in entry if n != 'router_minus_best'),
                 key=lambda n: (entry[n]['role'] != 'router', entry[n]['role'] == 'reference',
                                -entry[n]['aiq_mean']))
  best = entry.get('router_minus_best', {}).get('best')
  for n in order:
    e = entry[n]
    label = {'router': '**router**', 'reference': f'{n} (reference)'}.get(e['role'], n)
    if n == best:
      label = f'{n} (best baseline)'
    retained = '-' if e['best_retained_at_48'] is None else f"{e['best_retained_at_48']:.1%}"
    lines.append(f"| {label} | {e['aiq_mean']:.4f} | {fmt_ci(e['aiq_ci95'])} | "
                 f"{', '.join(f'{v:.4f}' for v in e['aiq'])} | {retained} |")
  if 'router_minus_best' in entry:
    d = entry['router_minus_best']
    lines += ['', f"router - best baseline ({d['best']}): {d['mean']:+.4f}, paired 95% CI "
              f"{fmt_ci(d['ci95'])}."]
  return lines + ['']


def summary_table(results: dict, infos: dict) -> list[str]:
  lines = ['| data set | router AIQ [95% CI] | best baseline | its AIQ | router - best [paired 95% CI] '
           '| router at >= 48.25% saved: retained |', '|---|---|---|---:|---|---:|']
  for name, entry in results.items():
    r, d = entry['router'], entry.get('router_minus_best')
    if d is None:
      continue
    retained = '-' if r['best_retained_at_48'] is None else f"{r['best_retained_at_48']:.1%}"
    lines.append(f"| {name} | {r['aiq_mean']:.4f} {fmt_ci(r['aiq_ci95'])} | {d['best']} | "
                 f"{entry[d['best']]['aiq_mean']:.4f} | {d['mean']:+.4f} {fmt_ci(d['ci95'])} | "
                 f'{retained} |')
  return lines + ['']


def ablation_table(ablations: dict, datasets: list[str]) -> list[str]:
  lines = ['| variant | seeds | ' + ' | '.join(datasets) + ' | final entropy | strongest share | '
           'needed, never picked |', '|---|' + '---:|' * (len(datasets) + 4)]
  for name, row in ablations.items():
    cells = []
    for ds in datasets:
      e = row['datasets'].get(ds)
      cells.append('-' if e is None else f"{e['aiq_mean']:.4f}")
    diag = row['diagnostics']
    lines.append(f"| {row['about']} | {row.get('seeds', '-')} | " + ' | '.join(cells) +
                 f" | {diag['entropy']:.3f} | {diag['strongest_share']:.1%} | "
                 f"{diag['needed_never_picked']:.2f} |")
  return lines + ['']


CURVE_METHODS = ('router', 'knn', 'linear', 'mlp', 'ensemble')


def curve_table(name: str, curve: dict, sizes: dict) -> list[str]:
  """One data set's learning curve: mean AIQ [95% CI] per training size (rows) for the
  router and the baselines on its features, and router - best baseline (paired)."""
  lines = [f'### {name}', '',
           '| train queries | ' + ' | '.join(CURVE_METHODS) + ' | router - best baseline |',
           '|---:|' + '---|' * (len(CURVE_METHODS) + 1)]
  for size, entry in curve.items():
    cells = [f"{entry[m]['aiq_mean']:.4f} {fmt_ci(entry[m]['aiq_ci95'])}" if m in entry else '-'
             for m in CURVE_METHODS]
    d = sizes.get(size, {}).get('router_minus_best')
    diff = '-' if d is None else f"{d['mean']:+.4f} {fmt_ci(d['ci95'])} vs {d['best']}"
    shown = size if size != 'all' else f"all ({sizes.get(size, {}).get('train', '?')})"
    lines.append(f'| {shown} | ' + ' | '.join(cells) + f' | {diff} |')
  return lines + ['']


def render_curve(curves: dict, curve_infos: dict, plot: Optional[str]) -> list[str]:
  """suite.md's learning-curve section (`suite --train_sizes`)."""
  lines = ['## Learning curve', '',
           'Every method trained on a seeded sample of N training queries (the same sample for '
           'every method; a fresh one per seed), scored on the whole test split; AIQ mean over '
           'seeds [95% CI over test resamples]; router - best baseline is paired, its best '
           'baseline the one with the highest mean AIQ at that N.', '']
  if plot:
    lines += [f'![learning curve]({plot})', '']
  for name, curve in curves.items():
    lines += curve_table(name, curve, curve_infos.get(name, {}))
  return lines


def render(results: dict, infos: dict, ablations: Optional[dict], command: str,
           total_seconds: float, curves: Optional[dict] = None,
           curve_infos: Optional[dict] = None, curve_plot: Optional[str] = None) -> str:
  lines = ['# Quality suite', '',
           f'`{command}` ({total_seconds / 60:.1f} min on this machine). AIQ on the test splits '
           '(area under the cost/accuracy hull over the single models\' cost range); 95% '
           'intervals resample the test queries (1 draw set shared by every method); the best '
           'baseline is the highest mean AIQ among the baselines; task_best and oracle read '
           'labels and are references only.', '', '## Summary', '']
  lines += summary_table(results, infos)
  lines += ['## Per data set', '']
  for name, entry in results.items():
    lines += dataset_table(name, entry, infos[name])
  if ablations:
    lines += ['## Ablations', '', 'The recipe with one part changed at a time (mean AIQ over '
              'the row\'s seeds; diagnostics on the test split at the operating lambda, '
              'averaged over data sets and seeds: the policy\'s mean entropy, the share of '
              'queries sent to the strongest model, and how many models the kNN anchor '
              'prefers on >= 2% of queries but the policy picks on < 0.2%).', '']
    lines += ablation_table(ablations, list(results))
  if curves:
    lines += render_curve(curves, curve_infos or {}, curve_plot)
  return '\n'.join(lines)


def update_readme(readme: pathlib.Path, body: str) -> None:
  """Replaces README's text between the suite markers with `body`."""
  start, end = '<!-- suite:start -->', '<!-- suite:end -->'
  text = readme.read_text()
  if start not in text or end not in text:
    raise ValueError(f'{readme}: no "{start}" ... "{end}" markers to put the tables between')
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  readme.write_text(f'{head}{start}\n{body.strip()}\n{end}{tail}')
