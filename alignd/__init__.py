"""alignd: online alignment of a served chat model (SFT → feedback → DPO by default, or KTO, or PPO against a reward
model → gate → hot-swap).

This package holds the entry points only: the `alignd` command (`alignd.cli`, commands in `alignd.commands`), the
demo, the simulated users and the alignment report. What every component shares lives in `core/`.
"""

__version__ = "0.1.0"
