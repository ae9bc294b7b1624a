"""Celery workers of the online loop: beat checks for new feedback, the `train` queue runs one cycle at a time.

The cycle is one pipeline of stage modules (workers/cycle.py lists them): data.py → reward_stage.py → update.py
(ppo_update.py | preference.py) → gate_stage.py → publish.py → settle.py; arena.py watches and rolls back.

alignd worker            # a worker on the train and default queues
alignd beat              # the scheduler (every ALIGND_CYCLE_SECONDS)
"""
