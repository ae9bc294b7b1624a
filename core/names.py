"""Celery task names and queues: one definition for the workers that register them and the API and CLI that
send them by name (`service/` never imports `workers/`, so a name is the only link between them)."""

TRAIN_CYCLE = "alignd.train_cycle"  # one training cycle; runs on TRAIN_QUEUE
MAYBE_TRAIN = "alignd.maybe_train"  # beat: enqueue a cycle when enough feedback waits
ARENA_WATCH = "alignd.arena_watch"  # beat: roll back on a low live arena win rate

TRAIN_QUEUE = "train"  # training workers: concurrency 1, prefetch 1 (ideally a GPU machine)
DEFAULT_QUEUE = "default"  # light periodic tasks that must not wait behind a training run
TRAIN_LOCK = "train"  # name of the fenced lock (store/lock.py) every publishing run holds
