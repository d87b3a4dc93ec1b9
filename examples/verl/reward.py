"""verl ``custom_reward_function`` file: reasonrl's numeric-answer verifier as verl's ``compute_score``.

    custom_reward_function:
      path: examples/verl/reward.py
      name: compute_score

See docs/integrations-verl.md. ``as_verl_score`` returns ``{"score": float, <per-item diagnostics>}``; an
unscorable response scores 0.0 with ``unscorable = 1`` (verl has no NaN handling).
"""

from reasonrl.rewards import NumericAnswerReward, as_verl_score

compute_score = as_verl_score(NumericAnswerReward())
