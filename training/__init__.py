"""alignd's learning core: the built-in instruction world, tokenizer, SFT, reward model, PPO, evaluation,
simulated annotators and checkpoint files. Pure torch/transformers: never imports Redis, Celery or HTTP code."""
