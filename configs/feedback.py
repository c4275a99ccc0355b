"""Learning from feedback: the RL stage, off-policy, on a deployed router's logs.

  python -m entrorouter_jax.train --config=configs/feedback.py \\
      --config.data.files=LOGS --config.rl.init_checkpoint=DIR --workdir=NEW

LOGS are feedback logs (data.format=feedback: id, query, model, score, cost,
propensity, ...) of the router trained in DIR, which the stage starts from: its
model and query-space settings (config.json's model and anchor sections), its
model names, c_ref and lambda set are kept, so NEW is a router like any other.
Stage selection is off (rl.select=''): its out-of-fold utility needs every
model's outcome per query, which feedback has only for the logged one;
`python -m entrorouter_jax.evaluate --workdir=NEW --feedback=LOGS` estimates
NEW's utility off-policy instead.
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.stages = 'rl'
  config.data.name = 'routing_files'
  config.data.format = 'feedback'
  config.rl.estimator = 'offpolicy'
  config.rl.select = ''
  return config
