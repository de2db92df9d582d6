"""rlhf: RLHF post-training (SFT, reward models, PPO, GRPO, DPO variants) on one shared path.

The library never imports Hydra or the recipes; recipes compose it. See README.md for the map.
"""

__version__ = "0.1.0"
