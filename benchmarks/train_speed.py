"""Speed of the token-transformer router: its real train steps and its routing forward.

  python benchmarks/train_speed.py --quick            # one JSON line per figure
  python benchmarks/train_speed.py --sizes=base,large --device=gpu

What is timed is the package's own code, not a copy of it: the train step is
`train.make_train_step` for stage 'sft' or 'rl', jitted the way
`train.run_stage` jits it (the state's shardings in and out, the batch
sharded over the mesh, the state donated), on a state from
`train.create_state`, fed batch by batch through `pipeline.to_global` as the
training loop feeds it. The config is configs/transformer.py (backbone
'scratch', softmax head) with the size's model.num_layers / d_model /
num_heads / mlp_dim, data.max_len = the sequence length and
<stage>.batch_size = the batch; model.dtype is 'float32' on the CPU and
'bfloat16' on accelerators. The data are synthetic (`synthetic_batch`):
random tokens (vocabulary data.vocab_size = 2000, a random length per query,
padded), outcomes, masks, costs and Stage 0's p_hat / c_bar for K = 11
models, in the dtypes the grain pipeline yields. `SyntheticProblem` holds
the few fields of a `train.Problem` that creating the state and building the
step read. The routing forward is `policy.make_forward` (what router.py
serves with) on freshly initialised parameters.

Every figure runs on one chip (the first device of the platform), and the
PyTorch reference (benchmarks/torch_reference.py: a `transformers`
BertModel of the same shapes, the same soft-target loss, AdamW) runs in the
same process on the same synthetic batch, its repeats alternating with the
JAX step's (benchmarks/timing.py: A B, B A, ...), so `jax_over_torch` (JAX's
speed over torch's: > 1 means JAX is faster) compares like with like under
the same load. torch is imported only when the reference runs.

Timing: a first step (compile included, reported as `first_step_s`), more
warm-up steps, then `repeats` rounds of `steps` steps per side, the last
result of each waited for with `jax.block_until_ready` (torch: synchronised);
the step time is the median over the rounds of (round time / steps). Each
timed run follows PAUSE = 0.5 s of rest (environment BENCH_PAUSE=seconds
overrides it), so that one side's spinning worker threads are idle before
the other side runs.

Model FLOPs of one train step (forward + backward = 3 x the forward):

  6 * tokens * L * (4 d^2 + 2 d mlp)      the matmuls of the encoder blocks
                                           (q, k, v, o and the two MLP layers)
  + 12 * L * seq^2 * d * batch             attention: q k^T and probs v, 2 * 2
                                           * batch * seq^2 * d per layer forward
  + 6 * batch * d * K                      the head, once per (pooled) query

with tokens = batch * seq (padding included: the step computes on it), L
layers, width d, MLP width mlp. The token-embedding lookup is a gather and
counts nothing; LayerNorms, softmaxes, GELUs and the loss are left out, as
usual. RL with rl.ppo_epochs = E > 1 makes E forward-backward passes and one
more forward: E + 1/3 times the figure (1 x with the default E = 1).
`model_flops_per_s` divides this by the step time; `matmul_fraction` divides
that by the rate of a jitted jnp.dot of two square matrices measured in the
same run (float32 on the CPU, bfloat16 on accelerators; its own
{"figure": "matmul"} row), i.e. how close the step comes to the chip's
dense-matmul speed as this JAX build reaches it.

The routing forward: batch 1 (latency p50 / p99 over many calls, each
waited for) and batch 256 (queries per second from the median call), inputs
already on the device, at the size's sequence length.

On a GPU, JAX and torch share the device: run this file as a script (which
turns XLA's memory preallocation off) or set XLA_PYTHON_CLIENT_PREALLOCATE=
false before JAX starts, or torch may run out of memory at the large sizes.
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__':
  # JAX and torch share the GPU: JAX should take memory as it needs it, not 75% upfront.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses
import functools
import gc
import importlib
import json
import statistics
import time
import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import transformer as transformer_config
from entrorouter_jax import policy, sharding, train
from entrorouter_jax import state as state_lib
from entrorouter_jax.data import pipeline

from benchmarks.timing import alternate, call_figures

VOCAB_SIZE = 2000      # configs/common.py's data.vocab_size
NUM_MODELS = 11        # K, the size of a RouterBench-like pool
ROUTING_BATCH = 256    # the throughput batch of the routing forward
PAUSE = 0.5            # seconds of rest before each timed run of one side (timing.alternate)
ROUTING_ROUNDS = 5     # rounds in which the routing forward's JAX and torch calls alternate


def pause() -> float:
  """Seconds of rest before each timed run (PAUSE, or the environment's BENCH_PAUSE)."""
  return float(os.environ.get('BENCH_PAUSE', PAUSE))


# Model dimensions (model.py's key names), batch and sequence length of each size.
SIZES = {
    'tiny': dict(num_layers=2, d_model=128, num_heads=4, mlp_dim=512, batch=32, seq=64),
    # The reduced 'base' of quick runs (model.py's 'small' dimensions).
    'small': dict(num_layers=4, d_model=256, num_heads=4, mlp_dim=1024, batch=16, seq=128),
    'base': dict(num_layers=12, d_model=768, num_heads=12, mlp_dim=3072, batch=128, seq=256),
    'large': dict(num_layers=24, d_model=1024, num_heads=16, mlp_dim=4096, batch=64, seq=256),
}
QUICK_SIZES = ('tiny', 'small')
FULL_SIZES = ('tiny', 'base', 'large')
STAGES = ('sft', 'rl')

# How many steps / calls each kind of run times.
QUICK_TIMING = dict(warmup=1, steps=2, repeats=5, latency_calls=50, throughput_calls=6)
FULL_TIMING = dict(warmup=3, steps=10, repeats=5, latency_calls=200, throughput_calls=20)
# The routing forward of quick runs: the tiny size only (batch 256 of 'small'
# takes seconds per call on a CPU).
QUICK_ROUTING_SIZES = ('tiny',)


# ================================================================ settings ===
def platform_of(device: str) -> str:
  """'cpu' | 'gpu' | 'tpu' from a device name ('cuda' counts as 'gpu')."""
  name = str(device).lower()
  return 'gpu' if name in ('cuda', 'gpu') else name


def compute_dtype(device: str) -> str:
  """model.dtype for a platform: float32 on the CPU, bfloat16 on accelerators."""
  return 'float32' if platform_of(device) == 'cpu' else 'bfloat16'


def size_config(size: str, stage: str, device: str):
  """configs/transformer.py at `size` for `stage`, on one chip of `device`."""
  dims = SIZES[size]
  config = transformer_config.get_config()
  config.model.update(num_layers=dims['num_layers'], d_model=dims['d_model'],
                      num_heads=dims['num_heads'], mlp_dim=dims['mlp_dim'],
                      dtype=compute_dtype(device))
  config.data.update(max_len=dims['seq'], vocab_size=VOCAB_SIZE)
  config[stage].batch_size = dims['batch']
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


def make_mesh(config, device: str):
  """The config's mesh over the first chip of the platform."""
  return sharding.make_mesh(config.mesh, jax.devices(platform_of(device))[:1])


@dataclasses.dataclass
class SyntheticProblem:
  """The fields of a `train.Problem` that `train.create_state` and
  `train.make_train_step` read, for synthetic data (no data set, no Stage 0)."""
  tokenizer: object                  # anything with .vocab_size
  model_names: list
  strongest: int = 0
  c_ref: float = 1.0
  lambda_set: Optional[np.ndarray] = None   # read by the utility head only
  feature_dim: Optional[int] = None         # read by the embeddings backbone only


def synthetic_problem(num_models: int = NUM_MODELS, vocab: int = VOCAB_SIZE):
  return SyntheticProblem(tokenizer=type('Vocab', (), {'vocab_size': vocab})(),
                          model_names=[f'model_{i}' for i in range(num_models)],
                          lambda_set=np.asarray([0.0, 0.1, 0.3], np.float32))


def synthetic_batch(rng: np.random.Generator, batch: int, seq: int,
                    vocab: int = VOCAB_SIZE, num_models: int = NUM_MODELS) -> dict:
  """A training batch in the pipeline's dtypes: tokens int32[B, L] (a length
  between L/4 and L per query, padded with 0), token_mask bool[B, L],
  outcomes / costs / p_hat / c_bar float32[B, K], outcome_mask bool[B, K],
  fold int32[B]."""
  lengths = rng.integers(max(seq // 4, 1), seq + 1, batch)
  mask = np.arange(seq)[None, :] < lengths[:, None]
  tokens = np.where(mask, rng.integers(2, vocab, (batch, seq)), 0).astype(np.int32)
  rates = np.linspace(0.3, 0.9, num_models)
  prices = np.geomspace(0.05, 1.0, num_models)
  return {
      'tokens': tokens, 'token_mask': mask,
      'outcomes': (rng.random((batch, num_models)) < rates).astype(np.float32),
      'outcome_mask': rng.random((batch, num_models)) < 0.95,
      'costs': (prices * rng.lognormal(0.0, 0.3, (batch, num_models))).astype(np.float32),
      'p_hat': np.clip(rates + rng.normal(0, 0.1, (batch, num_models)), 0, 1).astype(np.float32),
      'c_bar': np.broadcast_to(prices, (batch, num_models)).astype(np.float32),
      'fold': rng.integers(0, 5, batch).astype(np.int32),
  }


def model_flops(dims: dict, num_models: int = NUM_MODELS, passes: float = 1.0) -> float:
  """FLOPs of one train step at `dims` (the module docstring's formula);
  `passes` scales it (RL with several PPO epochs)."""
  layers, d, mlp = dims['num_layers'], dims['d_model'], dims['mlp_dim']
  batch, seq = dims['batch'], dims['seq']
  dense = 6.0 * batch * seq * layers * (4 * d * d + 2 * d * mlp)
  attention = 12.0 * layers * seq * seq * d * batch
  head = 6.0 * batch * d * num_models
  return passes * (dense + attention + head)


def _timing(quick: bool) -> dict:
  return QUICK_TIMING if quick else FULL_TIMING


def _torch_reference():
  """benchmarks/torch_reference.py, imported on first use (None without torch)."""
  name = f'{__package__}.torch_reference' if __package__ else 'torch_reference'
  try:
    return importlib.import_module(name)
  except ImportError as e:
    warnings.warn(f'no PyTorch reference: {e}')
    return None


def _torch_device_ok(device: str) -> bool:
  """The reference runs on the CPU and on CUDA GPUs (torch has no TPU backend here)."""
  return platform_of(device) in ('cpu', 'gpu')


# ================================================================ matmul ===
def matmul_figure(quick: bool, device: str) -> dict:
  """FLOP/s of a jitted jnp.dot of two n x n matrices on one chip: n = 1024 in
  float32 on the CPU, n = 8192 in bfloat16 on accelerators."""
  platform = platform_of(device)
  n, dtype = (1024, jnp.float32) if platform == 'cpu' else (8192, jnp.bfloat16)
  calls = 3 if platform == 'cpu' else 20
  dev = jax.devices(platform)[0]
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(key_a, (n, n), dtype), dev)
  b = jax.device_put(jax.random.normal(key_b, (n, n), dtype), dev)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  times = []
  for _ in range(3 if quick else 7):
    start = time.perf_counter()
    outs = [dot(a, b) for _ in range(calls)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - start) / calls)
  seconds = statistics.median(times)
  return {'figure': 'matmul', 'n': n, 'dtype': jnp.dtype(dtype).name, 'seconds': seconds,
          'flops_per_s': 2.0 * n ** 3 / seconds, 'device': str(dev)}


# ============================================================ train steps ===
def jitted_train_step(config, stage: str, problem, mesh):
  """(step_fn, state, batch sharding): the stage's step jitted as train.run_stage does."""
  _, schedule = state_lib.make_optimizer(config, stage)
  graphdef, state, shardings = train.create_state(config, stage, problem, mesh)
  if stage == 'rl':   # H_0, which run_stage measures after Stage 1: near uniform here
    h0 = 0.9 * np.log(len(problem.model_names))
    state['h0'] = jax.device_put(jnp.asarray(h0, jnp.float32), shardings['h0'])
  batch_sh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(train.make_train_step(config, stage, graphdef, problem, schedule),
                    in_shardings=(shardings, batch_sh),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
                    compiler_options=sharding.compiler_options())
  return step_fn, state, batch_sh


class JaxStepper:
  """`stage`'s real train step (`jitted_train_step`) on a fresh state, fed the
  `batches` in turn: `run(n)` makes n steps and returns the seconds per step
  (the last result waited for), so that its repeats can alternate with the
  reference's (timing.alternate). The first run includes the compile."""

  def __init__(self, config, stage: str, problem, mesh, batches: Sequence[dict]):
    self.mesh, self.batches = mesh, list(batches)
    self.step_fn, self.state, self.batch_sh = jitted_train_step(config, stage, problem, mesh)
    self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state['nnx'][0]))
    self.count, self.metrics = 0, None

  def run(self, n: int) -> float:
    start = time.perf_counter()
    with jax.set_mesh(self.mesh), warnings.catch_warnings():
      # The CPU backend cannot donate buffers; donation is still what training asks for.
      warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
      for _ in range(n):
        batch = pipeline.to_global(self.batches[self.count % len(self.batches)], self.batch_sh)
        self.state, self.metrics = self.step_fn(self.state, batch)
        self.count += 1
      jax.block_until_ready((self.state, self.metrics))
    return (time.perf_counter() - start) / n

  def close(self) -> None:
    del self.state, self.step_fn


def train_figures(quick: bool, device: str, sizes: Optional[Sequence[str]] = None,
                  stages: Sequence[str] = STAGES, torch_threads: Optional[int] = None
                  ) -> list[dict]:
  """One {"figure": "matmul"} row, then one {"figure": "train_step"} row per (size, stage).

  `sizes` (names in SIZES) default to QUICK_SIZES with `quick`, else
  FULL_SIZES; `device` is the platform ('cpu', 'gpu', 'tpu'). Per size, the
  stages' JAX steps and the torch reference's step on the same batches are
  built and warmed up, then their `repeats` alternate (timing.alternate), so
  that the ratio is not skewed by the machine's drift. The reference's loss
  is SFT's; RL's differs only in the K-wide terms after the head, so the SFT
  step is RL's reference too.
  """
  timing = _timing(quick)
  sizes = tuple(sizes or (QUICK_SIZES if quick else FULL_SIZES))
  matmul = matmul_figure(quick, device)
  rows = [matmul]
  problem = synthetic_problem()
  for size in sizes:
    dims = SIZES[size]
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, dims['batch'], dims['seq']) for _ in range(2)]
    configs = {stage: size_config(size, stage, device) for stage in stages}
    steppers, first = {}, {}
    for stage, config in configs.items():
      steppers[stage] = JaxStepper(config, stage, problem, make_mesh(config, device), batches)
      first[stage] = steppers[stage].run(1)
      steppers[stage].run(timing['warmup'])
    ref = _torch_stepper(size, dims, batches[0], problem, device, torch_threads)
    if ref is not None:
      ref.run(timing['warmup'] + 1)
      steppers['torch'] = ref
    times = alternate({name: functools.partial(s.run, timing['steps'])
                       for name, s in steppers.items()}, timing['repeats'],
                      pause=pause())
    torch_row = {'torch_samples_per_s': None}
    if ref is not None:
      step_s = statistics.median(times['torch'])
      info = ref.info()
      torch_row = {'torch_samples_per_s': dims['batch'] / step_s, 'torch_step_s': step_s,
                   'torch_dtype': info['dtype'], 'torch_threads': info['threads'],
                   'torch_loss': info['loss']}
      ref.close()
    for stage, config in configs.items():
      stepper, step_s = steppers[stage], statistics.median(times[stage])
      epochs = int(config.rl.ppo_epochs) if stage == 'rl' else 1
      flops = model_flops(dims, passes=epochs + (1.0 / 3.0 if epochs > 1 else 0.0))
      row = {
          'figure': 'train_step', 'size': size, 'stage': stage, 'batch': dims['batch'],
          'seq': dims['seq'], **{k: dims[k] for k in ('num_layers', 'd_model', 'num_heads',
                                                      'mlp_dim')},
          'dtype': config.model.dtype, 'params': stepper.params, 'step_s': step_s,
          'first_step_s': first[stage], 'samples_per_s': dims['batch'] / step_s,
          'tokens_per_s': dims['batch'] * dims['seq'] / step_s,
          'model_flops_per_step': flops, 'model_flops_per_s': flops / step_s,
          'matmul_fraction': flops / step_s / matmul['flops_per_s'],
          'loss': float(stepper.metrics['loss']), 'rounds': timing['repeats'], **torch_row}
      ref_speed = torch_row.get('torch_samples_per_s')
      row['jax_over_torch'] = row['samples_per_s'] / ref_speed if ref_speed else None
      rows.append(row)
      stepper.close()
    del steppers
    gc.collect()
  return rows


def _torch_stepper(size, dims, batch, problem, device, threads):
  """The reference's TrainStepper for one size (None without torch)."""
  ref = _torch_reference() if _torch_device_ok(device) else None
  if ref is None:
    return None
  config = size_config(size, 'sft', device)
  return ref.TrainStepper(
      _torch_dims(dims), batch, device=device, c_ref=problem.c_ref,
      cost_weight=config.sft.cost_weight, tau=config.sft.tau, tau_anchor=config.anchor.tau,
      mix=config.sft.anchor_mix, threads=threads)


def _torch_dims(dims: dict) -> dict:
  return dict({k: dims[k] for k in ('num_layers', 'd_model', 'num_heads', 'mlp_dim')},
              vocab_size=VOCAB_SIZE, max_len=dims['seq'], num_models=NUM_MODELS)


# ======================================================== routing forward ===
def jax_router(config, mesh):
  """(forward, params): policy.make_forward (what router.py routes with) and
  freshly initialised parameters, replicated on the mesh."""
  model = policy.build_model(config, VOCAB_SIZE, NUM_MODELS, config.seed)
  graphdef, params = nnx.split(model)
  return (policy.make_forward(config, graphdef, mesh),
          jax.device_put(params, sharding.replicated(mesh)))


def jax_forward_caller(forward, params, mesh, arrays: dict):
  """`call()`: `forward` once on `arrays` (the forward's inputs, one batch, see
  policy.policy_arrays, put on the device first), waited for; returns its seconds."""
  batch_sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    batch = {k: jax.device_put(v, batch_sh) for k, v in arrays.items()}

  def call() -> float:
    with jax.set_mesh(mesh):
      start = time.perf_counter()
      jax.block_until_ready(forward(params, batch))
      return time.perf_counter() - start

  return call


def routing_forward_figures(quick: bool, device: str, sizes: Optional[Sequence[str]] = None,
                            torch_threads: Optional[int] = None) -> list[dict]:
  """{"figure": "routing_forward"} rows: per size, batch 1 (latency p50 / p99 in
  ms; jax_over_torch = torch's p50 / JAX's p50) and batch 256 (queries/s;
  jax_over_torch = JAX's / torch's), each beside the torch reference's figure.
  The calls of both sides alternate in ROUTING_ROUNDS rounds (timing.alternate).
  `sizes` default to QUICK_ROUTING_SIZES with `quick`, else FULL_SIZES."""
  timing = _timing(quick)
  sizes = tuple(sizes or (QUICK_ROUTING_SIZES if quick else FULL_SIZES))
  ref = _torch_reference() if _torch_device_ok(device) else None
  rows = []
  for size in sizes:
    dims = SIZES[size]
    config = size_config(size, 'sft', device)
    mesh = make_mesh(config, device)
    data = synthetic_batch(np.random.default_rng(1), ROUTING_BATCH, dims['seq'])
    forward, params = jax_router(config, mesh)
    torch_model = ref.build(_torch_dims(dims), device) if ref is not None else None
    for batch, calls in ((1, timing['latency_calls']), (ROUTING_BATCH,
                                                         timing['throughput_calls'])):
      arrays = policy.policy_arrays(
          {'tokens': data['tokens'][:batch], 'token_mask': data['token_mask'][:batch]},
          data['p_hat'][:batch], data['c_bar'][:batch], config.sft.cost_weight)
      callers = {'jax': jax_forward_caller(forward, params, mesh, arrays)}
      if torch_model is not None:
        callers['torch'], _ = ref.forward_caller(_torch_dims(dims), arrays['tokens'],
                                                 arrays['token_mask'], device=device,
                                                 model=torch_model, threads=torch_threads)
      for call in callers.values():
        for _ in range(3 if batch == 1 else 1):
          call()
      rounds = min(ROUTING_ROUNDS, calls)
      per_round = -(-calls // rounds)
      times = alternate({name: (lambda call=call: [call() for _ in range(per_round)])
                         for name, call in callers.items()}, rounds)
      jx = call_figures(times['jax'], batch)
      row = {'figure': 'routing_forward', 'size': size, 'batch': batch, 'seq': dims['seq'],
             'dtype': config.model.dtype, 'calls': rounds * per_round, **jx}
      if 'torch' in times:
        tr = call_figures(times['torch'], batch)
        row.update({f'torch_{k}': tr[k] for k in ('latency_p50_ms', 'latency_p99_ms',
                                                  'queries_per_s')})
        row['jax_over_torch'] = (tr['latency_p50_ms'] / jx['latency_p50_ms'] if batch == 1
                                 else jx['queries_per_s'] / tr['queries_per_s'])
      else:
        row.update(torch_latency_p50_ms=None, torch_queries_per_s=None, jax_over_torch=None)
      rows.append(row)
    del torch_model, forward, params
    gc.collect()
  return rows


# ==================================================================== CLI ===
def main(argv=None) -> None:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help=f'sizes {QUICK_SIZES}, few steps (default sizes: {FULL_SIZES})')
  parser.add_argument('--device', default=jax.default_backend(), help='cpu | gpu | tpu')
  parser.add_argument('--sizes', default='', help=f'comma-separated, of {sorted(SIZES)}')
  parser.add_argument('--routing_sizes', default='', help='the routing forward\'s sizes')
  parser.add_argument('--figures', default='train,routing', help='train and/or routing')
  parser.add_argument('--torch_threads', type=int, default=None,
                      help='torch intra-op threads (default: every CPU core)')
  args = parser.parse_args(argv)
  split = lambda text: [s.strip() for s in text.split(',') if s.strip()] or None
  wanted = split(args.figures) or []
  if 'train' in wanted:
    for row in train_figures(args.quick, args.device, split(args.sizes),
                             torch_threads=args.torch_threads):
      print(json.dumps(row), flush=True)
  if 'routing' in wanted:
    for row in routing_forward_figures(args.quick, args.device, split(args.routing_sizes),
                                       torch_threads=args.torch_threads):
      print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
