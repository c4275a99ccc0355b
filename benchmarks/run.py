"""Every speed figure of entrorouter_jax in one run, printed as JSON lines.

  python benchmarks/run.py --quick --device=cpu            # ~10 min on two CPU cores
  python benchmarks/run.py --device=gpu --out=gpu.jsonl     # full sizes

One JSON object per figure, then a summary object last. The figures:
  matmul, train_step   the real jitted SFT / RL steps of train.py on synthetic
                       batches (benchmarks/train_speed.py), with the PyTorch
                       reference's speed on the same shapes (jax_over_torch)
  routing_forward      the token transformer router's jitted forward alone,
                       batch 1 and 256, against the same reference
  route                the default router end to end through router.Router
                       (TF-IDF + MiniLM features, kNN tables, policy), batch 1
                       and 256 (benchmarks/routing_speed.py)
  route_encoder        its query encoder (MiniLM) alone, one query a call,
                       against the same checkpoint in PyTorch, and its floor:
                       the query's forward FLOPs at the matmul row's rate
  embed                that encoder embedding a data set of long texts
                       (batches of 64), against PyTorch
  train_loop           the default recipe's train.run_stage against its jitted
                       step alone: how much the loop around the step costs
                       (benchmarks/loop_speed.py)
  stage0               Stage 0's leave-one-out kNN table at N = 10k, 100k, 1M,
                       with the recall of the search it used
                       (benchmarks/stage0_speed.py); stage0_real_recall: the
                       approximate search on the shared data sets' embeddings
  pipeline             the grain input pipeline's examples/s at the same N
                       (benchmarks/pipeline_speed.py)
The machine is shared and noisy: compare figures of one run, and read speed
against the reference timed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Before JAX starts: on a GPU, JAX must not take the memory torch needs.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import (loop_speed, pipeline_speed, routing_speed, stage0_speed,  # noqa: E402
                        train_speed)

def summarize(figs: list[dict], device: str, seconds: float) -> dict:
  """The summary object: the headline figure of each kind and whether it meets its target."""
  by = lambda kind: [f for f in figs if f['figure'] == kind]
  train = by('train_step')
  # The headline train figure: the largest size timed, SFT.
  head = max((f for f in train if f['stage'] == 'sft'), key=lambda f: f['model_flops_per_s'],
             default=None) if train else None
  route1 = next((f for f in by('route') if f['batch'] == 1), {})
  route256 = next((f for f in by('route') if f['batch'] == 256), {})
  s0 = {f['n']: f for f in by('stage0')}
  big = s0.get(max(s0)) if s0 else {}
  fwd = by('routing_forward')
  encoder = next(iter(by('route_encoder')), {})
  embed = next(iter(by('embed')), {})
  real = [f['recall'] for f in by('stage0_real_recall')]
  loop = next(iter(by('train_loop')), {})
  out = {'figure': 'summary', 'device': device, 'seconds': round(seconds, 1),
         'route_latency_ms_p50': route1.get('latency_ms_p50'),
         'route_latency_ms_p99': route1.get('latency_ms_p99'),
         'route_queries_per_s_256': route256.get('queries_per_s'),
         'train_samples_per_s': head and head['samples_per_s'],
         'train_size': head and head['size'],
         'train_matmul_fraction': head and head.get('matmul_fraction'),
         'jax_over_torch_train': head and head.get('jax_over_torch'),
         'jax_over_torch_train_all': {f"{f['size']}/{f['stage']}": f.get('jax_over_torch')
                                      for f in train},
         'jax_over_torch_route_forward': {f"{f['size']}/b{f['batch']}": f.get('jax_over_torch')
                                          for f in fwd},
         'jax_over_torch_route_encoder': encoder.get('jax_over_torch'),
         'route_encoder_ms_p50': encoder.get('latency_ms_p50'),
         'route_encoder_floor_ms_p50': encoder.get('floor_ms_p50'),
         'route_encoder_matmul_fraction': encoder.get('matmul_fraction'),
         'embed_queries_per_s': embed.get('queries_per_s'),
         'jax_over_torch_embed': embed.get('jax_over_torch'),
         'stage0_seconds_1m': s0.get(1_000_000, {}).get('seconds'),
         'stage0_recall': big.get('recall'),
         'stage0_real_recall_min': min(real) if real else None,
         'stage0_seconds': {str(n): f['seconds'] for n, f in s0.items()},
         'pipeline_examples_per_s': {str(f['n']): f['examples_per_s']
                                     for f in by('pipeline')},
         'train_loop_input_over_step': loop.get('loop_input_over_step'),
         'train_loop_recipe_over_step': loop.get('loop_recipe_over_step')}
  if device == 'cpu':
    ratios = [v for v in list(out['jax_over_torch_train_all'].values()) +
              list(out['jax_over_torch_route_forward'].values()) +
              [out['jax_over_torch_route_encoder'], out['jax_over_torch_embed']]
              if v is not None]
    out['targets_met'] = {
        'route_latency_ms_p50 <= 5': _le(out['route_latency_ms_p50'], 5.0),
        'stage0_seconds_1m < 300': _le(out['stage0_seconds_1m'], 300.0),
        'stage0_recall >= 0.95': _le(0.95, out['stage0_recall']),
        'every jax_over_torch >= 1': min(ratios) >= 1.0 if ratios else None}
  return out


def _le(a, b):
  return None if a is None or b is None else bool(a <= b)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='tiny and a reduced base model, fewer steps and calls')
  parser.add_argument('--device', default='cpu', choices=('cpu', 'gpu', 'tpu'))
  parser.add_argument('--out', default='', help='also write the JSON lines to this file')
  parser.add_argument('--workdir', default=None,
                      help='a trained router to time (default: train a short one)')
  parser.add_argument('--skip', default='',
                      help='kinds to leave out: train,route,loop,stage0,pipeline')
  args = parser.parse_args(argv)
  skip = {s.strip() for s in args.skip.split(',') if s.strip()}
  started = time.time()
  figs = []
  out = open(args.out, 'w') if args.out else None

  def emit(rows):
    for row in rows:
      figs.append(row)
      line = json.dumps(row)
      print(line, flush=True)
      if out:
        out.write(line + '\n')
        out.flush()

  sizes = [10_000, 100_000, 1_000_000]
  if 'train' not in skip:
    emit(train_speed.train_figures(args.quick, args.device))
    emit(train_speed.routing_forward_figures(args.quick, args.device))
  if 'route' not in skip:
    emit(routing_speed.routing_figures(args.workdir, calls=100 if args.quick else 500))
  if 'loop' not in skip:
    emit(loop_speed.loop_figures(steps=200 if args.quick else 500))
  if 'pipeline' not in skip:
    emit(pipeline_speed.pipeline_figures(sizes))
  if 'stage0' not in skip:
    emit(stage0_speed.stage0_figures(sizes, time_exact_max=10_000 if args.quick else 100_000))
    emit(stage0_speed.real_recall_figures(stage0_speed.DEFAULT_NPROBE))
  summary = summarize(figs, args.device, time.time() - started)
  emit([summary])
  if out:
    out.close()
  return summary


if __name__ == '__main__':
  main()
