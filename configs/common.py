"""Shared defaults for every config. Each file in configs/ starts from here.

Override any key on the command line, e.g.
  python -m entrorouter_jax.train --config=configs/rl.py --config.rl.cost_weight=0.3
Keys marked (choice) are this project's own choices where METHOD.md leaves one.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Which stages to run, in order: 'sft', 'rl' or 'sft,rl'. configs/rl.py runs
  # SFT first unless rl.init_checkpoint names an SFT checkpoint.
  config.stages = 'sft,rl'

  # --- data (entrorouter_jax/data/sources.py) ---
  config.data = data = ml_collections.ConfigDict()
  data.name = 'synthetic_routing'    # synthetic_routing | routerbench | routing_files
  data.data_dir = ''                 # where TFDS keeps prepared data ('' = TFDS default)
  data.manual_dir = ''               # routerbench: folder holding the local file
  data.files = ''                    # routing_files: comma-separated paths
  data.format = 'wide'               # routing_files: wide | long | routerdc | routellm
  data.pool = ''                     # model-pool file (YAML/JSON) with prices per 1M tokens
  data.read_options = ml_collections.ConfigDict()  # extra reader keywords (see readers.py)
  data.models = ''                   # comma-separated subset of the pool ('' = all)
  data.synthetic = ml_collections.ConfigDict(dict(
      seed=0, num_train=20_000, num_validation=2_000, num_test=2_000))
  data.max_len = 64                  # tokens per query after truncation/padding
  data.truncate = 'right'            # 'right' keeps the start, 'left' keeps the end
  data.vocab_size = 2000             # sentencepiece vocabulary trained on the train split
  data.tokenizer = ''                # a given sentencepiece .model ('' = train one)

  # --- the policy network (entrorouter_jax/model.py, entrorouter_jax/backbones/) ---
  config.model = model = ml_collections.ConfigDict()
  # scratch: model.py's own encoder (size, layers... below); hf_encoder (BERT
  # family) / hf_decoder (Llama, Gemma): pretrained weights from model.checkpoint,
  # a Hugging Face-format folder; the tokenizer then comes from that folder too.
  model.backbone = 'scratch'
  model.checkpoint = ''
  model.freeze_backbone = False      # pretrained backbone: train only the head
  model.size = 'tiny'                # tiny | small | base | large
  model.num_layers = 0               # 0 = from size; > 0 overrides
  model.d_model = 0
  model.num_heads = 0
  model.mlp_dim = 0
  model.dtype = 'float32'            # compute dtype; 'bfloat16' on accelerators
  model.positions = 'learned'        # learned | rotary
  model.mlp = 'gelu'                 # gelu | swiglu
  model.pooling = 'mean'             # mean | cls (scratch, hf_encoder) | last (hf_decoder)
  model.dropout = 0.0
  model.temperature = 1.0            # T in pi = softmax(f(x) / T)
  # (choice, go-beyond) lambda as an input: one checkpoint serves the whole curve.
  model.lambda_conditioned = False
  model.lambda_min = 0.0             # training samples lambda from [min, max]
  model.lambda_max = 1.0
  # (choice) logits = f(x) + log A(m|x): the network learns corrections to the anchor.
  model.anchor_in_logits = False

  # --- Stage 0: capability estimates and the anchor (entrorouter_jax/capability.py) ---
  config.anchor = anchor = ml_collections.ConfigDict()
  anchor.space = 'tfidf'             # kNN space: tfidf | backbone (the pretrained embeddings)
  anchor.k = 50                      # neighbours
  anchor.alpha = 5.0                 # Beta-prior strength of the shrinkage
  anchor.prior = 'task'              # shrink toward the task mean ('task') or global mean
  anchor.dim = 256                   # TF-IDF -> SVD dimensions
  anchor.min_df = 2
  anchor.tau = 0.1                   # tau_A: anchor temperature

  # --- optimiser (shared by both stages) ---
  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0.01
  optim.grad_clip = 1.0
  optim.b1 = 0.9
  optim.b2 = 0.999
  # Pretrained backbone: its learning rate = this x the stage's (same schedule).
  optim.backbone_lr_scale = 0.1

  # --- Stage 1: Soft Supervision ---
  config.sft = sft = ml_collections.ConfigDict()
  sft.num_steps = 600
  sft.batch_size = 128
  sft.learning_rate = 1e-3
  sft.warmup_steps = 50
  sft.cost_weight = 0.1              # lambda inside the soft targets u = y - lambda c_hat
  sft.tau = 0.1                      # tau_S: soft-target temperature
  sft.anchor_mix = 0.1               # eps: q <- (1 - eps) q + eps A

  # --- Stage 2: RL with the Soft Anchor ---
  config.rl = rl = ml_collections.ConfigDict()
  rl.num_steps = 800
  rl.batch_size = 128
  rl.learning_rate = 3e-4
  rl.warmup_steps = 20
  rl.init_checkpoint = ''            # an SFT workdir/checkpoint; '' = run SFT first
  rl.cost_weight = 0.1               # lambda: accuracy points per strongest-model cost
  rl.estimator = 'reinforce'         # reinforce | exact (variance-free reference)
  rl.group_size = 8                  # G actions per query
  # (choice) divide by the group std + 1e-6 as in GRPO. Off by default: the std
  # rescales each group's reward gaps to unit size, so when every sample
  # succeeds a tiny cost gap weighs like a failure, and lambda loses its meaning.
  rl.normalize_advantage = False
  rl.ppo_epochs = 1                  # > 1: several PPO-clip updates per batch
  rl.ppo_clip = 0.2
  rl.beta_start = 0.1                # Soft Anchor KL weight, decays on the schedule
  rl.beta_end = 0.01
  rl.entropy_schedule = 'linear'     # linear | cosine: H*_t from H_0 to entropy_min
  rl.entropy_min = 0.1               # H_min (nats)
  rl.entropy_lr = 0.5                # eta of the dual ascent on alpha
  rl.alpha_init = 0.0
  rl.collapse_threshold = 0.02       # alarm: share below this where p_hat says the model is needed

  # --- scale-out ---
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1                     # -1 fills the devices left over
  mesh.fsdp = 1
  mesh.tensor = 1

  # --- bookkeeping ---
  config.log_every = 20
  config.checkpoint_every = 200
  config.keep_checkpoints = 2
  config.eval_batch_size = 512
  return config
