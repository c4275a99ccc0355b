"""The PyTorch reference for the speed figures: the router's network in `transformers`.

benchmarks/train_speed.py times the package's JAX train step and routing
forward; this module times the same work in PyTorch, so that each JAX figure
can be read against a familiar baseline (`jax_over_torch`). It is a
benchmark-only extra: torch is imported here and nowhere in entrorouter_jax.

The network, for the same (num_layers, d_model, num_heads, mlp_dim, vocab,
max_len, K) as the JAX router (configs/transformer.py):

  tokens int32[B, L], mask bool[B, L]
    -> transformers.BertModel (randomly initialised from a BertConfig, no
       download; dropout 0 as model.dropout; post-LN where model.py is pre-LN,
       and BERT's embedding LayerNorm and token-type table on top: the same
       matmuls, so the same FLOPs up to a few vector ops)
    -> masked mean over the sequence (model.pooling='mean')
    -> LayerNorm -> Linear(d_model, K): the policy logits f(x), float32[B, K].

The loss is Soft Supervision's (objectives.sft_loss): the cross-entropy of
softmax(f) against the soft targets q(m|x) proportional to
exp((y - lambda c_hat) / tau_S), mixed with the anchor A (softmax of
(p_hat - lambda c_bar) / tau_A), A alone where no model succeeds. A train step
is forward, loss, backward, clip to global norm 1 (optim.grad_clip), AdamW
(lr 1e-3, betas 0.9 / 0.999, weight decay 0.01 as configs/common.py;
fused=True on CUDA). Precision: bfloat16 autocast on CUDA (as model.dtype =
'bfloat16' there), float32 on the CPU. Eager PyTorch, no torch.compile.

  time_train_step(dims, batch)       -> {'samples_per_s', 'step_s', ...}
  time_forward(dims, tokens, mask)   -> {'latency_p50_ms', ...} or {'queries_per_s', ...}
  sentence_encoder(model_dir)        the query encoder of routing (MiniLM) in torch
  TrainStepper / forward_caller      the same work as objects whose runs the
                                     benchmarks alternate with JAX's (alternate)

`dims` is a dict with the model.py key names: num_layers, d_model, num_heads,
mlp_dim, plus vocab_size, max_len and num_models. `batch` is the numpy batch
train_speed.synthetic_batch builds: tokens, token_mask, outcomes,
outcome_mask, costs, p_hat, c_bar.

Threads: torch uses every CPU core (`setup_threads`), with OpenMP's passive
wait policy (OMP_WAIT_POLICY=PASSIVE, set here unless the environment sets
it, and only effective if torch was not imported before this module): with
the default spinning wait, a CPU that any other job keeps busy stalls torch's
threads on each other (measured on a loaded 2-core machine: a 6x slower step
at 2 threads than at 1), which would say more about the machine than about
torch.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

try:
  from benchmarks.timing import call_figures  # noqa: E402
except ImportError:   # run as a script from benchmarks/
  from timing import call_figures  # noqa: E402

_NEG_INF = -1e9


def device_for(device: str) -> torch.device:
  """'gpu' / 'cuda' -> the first CUDA device (when torch sees one); anything else -> CPU."""
  if device.lower() in ('gpu', 'cuda') and torch.cuda.is_available():
    return torch.device('cuda', 0)
  return torch.device('cpu')


def setup_threads(count: int | None = None) -> int:
  """Sets torch's intra-op threads: `count`, default every CPU core (XLA's CPU
  backend uses them all too); returns the count. On a machine that other jobs
  keep busy, fewer threads than cores avoid oversubscription stalls."""
  count = int(count or os.cpu_count() or 1)
  torch.set_num_threads(count)
  return count


class TorchRouter(nn.Module):
  """BertModel -> masked mean pooling -> LayerNorm -> K-way linear head."""

  def __init__(self, dims: dict):
    super().__init__()
    d = int(dims['d_model'])
    config = BertConfig(
        vocab_size=int(dims['vocab_size']), hidden_size=d,
        num_hidden_layers=int(dims['num_layers']), num_attention_heads=int(dims['num_heads']),
        intermediate_size=int(dims['mlp_dim']), max_position_embeddings=int(dims['max_len']),
        type_vocab_size=1, hidden_act='gelu', hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    self.encoder = BertModel(config, add_pooling_layer=False)
    self.head_ln = nn.LayerNorm(d)
    self.head = nn.Linear(d, int(dims['num_models']))

  def forward(self, tokens, mask):
    """tokens int64[B, L], mask int64[B, L] (1 = real token) -> logits float32[B, K]."""
    hidden = self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(torch.float32)
    pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return self.head(self.head_ln(pooled)).float()


def soft_target_loss(logits, outcomes, outcome_mask, cost_hat, p_hat, c_bar, *,
                     cost_weight: float, tau: float, tau_anchor: float, mix: float):
  """objectives.sft_loss in torch (one lambda for the whole batch): a scalar."""
  anchor = torch.softmax((p_hat - cost_weight * c_bar) / tau_anchor, dim=-1)
  u = outcomes - cost_weight * cost_hat
  q = torch.softmax(torch.where(outcome_mask, u / tau, torch.full_like(u, _NEG_INF)), dim=-1)
  q = (1.0 - mix) * q + mix * anchor
  any_success = (outcome_mask & (outcomes > 0)).any(dim=-1, keepdim=True)
  q = torch.where(any_success, q, anchor)
  return F.cross_entropy(logits, q)   # probability targets: mean of -sum q log softmax


def _sync(dev: torch.device) -> None:
  if dev.type == 'cuda':
    torch.cuda.synchronize(dev)


def _autocast(dev: torch.device):
  """bfloat16 autocast on CUDA; a no-op context on the CPU (float32 there)."""
  return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == 'cuda')


def _tensors(batch: dict, dev: torch.device) -> dict:
  """The numpy batch as torch tensors on `dev` (tokens and mask as int64, as BERT takes)."""
  out = {'tokens': torch.as_tensor(np.asarray(batch['tokens'], np.int64), device=dev),
         'mask': torch.as_tensor(np.asarray(batch['token_mask'], np.int64), device=dev)}
  for key in ('outcomes', 'costs', 'p_hat', 'c_bar'):
    if key in batch:
      out[key] = torch.as_tensor(np.asarray(batch[key], np.float32), device=dev)
  if 'outcome_mask' in batch:
    out['outcome_mask'] = torch.as_tensor(np.asarray(batch['outcome_mask'], bool), device=dev)
  return out


def build(dims: dict, device: str = 'cpu', seed: int = 0) -> TorchRouter:
  """The reference network with random weights, on `device`."""
  torch.manual_seed(seed)
  return TorchRouter(dims).to(device_for(device))


class TrainStepper:
  """The reference train step, built once on one fixed batch: `run(n)` makes n
  steps, synchronised at the end, and returns the seconds per step, so that
  benchmarks/train_speed.py can alternate its repeats with the JAX step's."""

  def __init__(self, dims: dict, batch: dict, *, device: str = 'cpu', c_ref: float = 1.0,
               cost_weight: float = 0.1, tau: float = 0.1, tau_anchor: float = 0.1,
               mix: float = 0.1, threads: int | None = None):
    self.threads = setup_threads(threads)
    self.dev = dev = device_for(device)
    self.dtype = 'bfloat16' if dev.type == 'cuda' else 'float32'
    self.batch_size = int(batch['tokens'].shape[0])
    self.model = build(dims, device)
    self.model.train()
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.999),
                                       weight_decay=0.01, fused=dev.type == 'cuda')
    self.t = _tensors(batch, dev)
    self.cost_hat = self.t['costs'] / c_ref
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.loss_settings = dict(cost_weight=cost_weight, tau=tau, tau_anchor=tau_anchor, mix=mix)
    self.loss = None

  def step(self):
    t = self.t
    self.optimizer.zero_grad(set_to_none=True)
    with _autocast(self.dev):
      logits = self.model(t['tokens'], t['mask'])
    loss = soft_target_loss(logits.float(), t['outcomes'], t['outcome_mask'], self.cost_hat,
                            t['p_hat'], t['c_bar'], **self.loss_settings)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.optimizer.step()
    self.loss = loss

  def run(self, n: int) -> float:
    """n steps; the seconds per step (synchronised once, after the last)."""
    start = time.perf_counter()
    for _ in range(n):
      self.step()
    _sync(self.dev)
    return (time.perf_counter() - start) / n

  def info(self) -> dict:
    return {'device': str(self.dev), 'dtype': self.dtype, 'threads': self.threads,
            'loss': None if self.loss is None else float(self.loss.detach())}

  def close(self) -> None:
    del self.model, self.optimizer, self.t
    if self.dev.type == 'cuda':
      torch.cuda.empty_cache()


def time_train_step(dims: dict, batch: dict, *, device: str = 'cpu', c_ref: float = 1.0,
                    cost_weight: float = 0.1, tau: float = 0.1, tau_anchor: float = 0.1,
                    mix: float = 0.1, warmup: int = 2, steps: int = 5,
                    repeats: int = 3, threads: int | None = None) -> dict:
  """Times the reference train step on one fixed batch (`TrainStepper` alone).

  `warmup` steps run first (allocator and kernel warm-up, not timed), then
  `repeats` times `steps` steps, each repeat synchronised at its end; the
  step time is the median over the repeats of (repeat time / steps).
  Returns {'samples_per_s', 'step_s', 'loss', 'device', 'dtype', 'threads'}.
  """
  stepper = TrainStepper(dims, batch, device=device, c_ref=c_ref, cost_weight=cost_weight,
                         tau=tau, tau_anchor=tau_anchor, mix=mix, threads=threads)
  if warmup:
    stepper.run(warmup)
  step_s = statistics.median(stepper.run(steps) for _ in range(repeats))
  result = {'samples_per_s': stepper.batch_size / step_s, 'step_s': step_s, **stepper.info()}
  stepper.close()
  return result


def forward_caller(dims: dict, tokens: np.ndarray, mask: np.ndarray, *, device: str = 'cpu',
                   model: TorchRouter | None = None, threads: int | None = None):
  """(call, info): `call()` runs the reference forward (logits and softmax, no
  gradients) once on this batch, synchronised, and returns its seconds; the
  inputs sit on the device before the first call."""
  threads = setup_threads(threads)
  dev = device_for(device)
  model = build(dims, device) if model is None else model
  model.eval()
  t = _tensors({'tokens': tokens, 'token_mask': mask}, dev)

  def call() -> float:
    start = time.perf_counter()
    with torch.inference_mode(), _autocast(dev):
      torch.softmax(model(t['tokens'], t['mask']), dim=-1)
    _sync(dev)
    return time.perf_counter() - start

  return call, {'device': str(dev), 'dtype': 'bfloat16' if dev.type == 'cuda' else 'float32',
                'threads': threads}


def time_forward(dims: dict, tokens: np.ndarray, mask: np.ndarray, *, device: str = 'cpu',
                 calls: int = 200, warmup: int = 3, model: TorchRouter | None = None,
                 threads: int | None = None) -> dict:
  """Times the reference forward (`forward_caller` alone), every call on its own.

  Batch 1 reads as latency, larger batches as throughput; both come back:
  {'latency_p50_ms', 'latency_p99_ms', 'queries_per_s' (batch / median call),
   'batch', 'device', 'dtype', 'threads'}.
  """
  call, info = forward_caller(dims, tokens, mask, device=device, model=model, threads=threads)
  for _ in range(warmup):
    call()
  return {**call_figures([call() for _ in range(calls)], tokens.shape[0]), **info}


def sentence_encoder(model_dir: str, *, device: str = 'cpu', threads: int | None = None):
  """`embed(ids, mask) -> float32[B, H]`: a Hugging Face BERT-family folder's
  model in `transformers` (local files only), mean-pooled over the real tokens
  and L2-normalised, as sentence-transformers and the package's EncoderSpace
  embed a query: the reference for the query-encoder part of routing."""
  setup_threads(threads)
  dev = device_for(device)
  model = BertModel.from_pretrained(model_dir, add_pooling_layer=False,
                                    local_files_only=True).to(dev).eval()

  def embed(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    t = _tensors({'tokens': ids, 'token_mask': mask}, dev)
    with torch.inference_mode(), _autocast(dev):
      hidden = model(input_ids=t['tokens'], attention_mask=t['mask']).last_hidden_state
    weights = t['mask'].unsqueeze(-1).to(torch.float32)
    pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1).cpu().numpy()

  return embed


if __name__ == '__main__':
  # A quick self-check: one tiny train-step timing and one forward timing.
  import json
  dims = dict(num_layers=2, d_model=128, num_heads=4, mlp_dim=512, vocab_size=2000,
              max_len=64, num_models=11)
  rng = np.random.default_rng(0)
  b, length, k = 32, 64, 11
  batch = {'tokens': rng.integers(1, 2000, (b, length)).astype(np.int32),
           'token_mask': np.ones((b, length), bool),
           'outcomes': (rng.random((b, k)) < 0.5).astype(np.float32),
           'outcome_mask': np.ones((b, k), bool), 'costs': rng.random((b, k)).astype(np.float32),
           'p_hat': rng.random((b, k)).astype(np.float32),
           'c_bar': rng.random((b, k)).astype(np.float32)}
  print(json.dumps(time_train_step(dims, batch)))
  print(json.dumps(time_forward(dims, batch['tokens'][:1], batch['token_mask'][:1], calls=50)))
