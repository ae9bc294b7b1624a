"""alignd: online alignment of a served chat model (SFT → feedback → reward model → PPO → hot-swap).

This package holds what every component shares: the one settings object (`alignd.config`), the embedded
Redis server (`alignd.redis_server`) and the command line (`alignd.cli`).
"""

__version__ = "0.1.0"
