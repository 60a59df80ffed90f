"""The learner proper: the PPO math, the policy with its value head, the learner and its ranks."""
