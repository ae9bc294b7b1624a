"""Celery workers of the online loop: beat checks for new feedback, the `train` queue runs one cycle at a time.

alignd worker            # a worker on the train and default queues
alignd beat              # the scheduler (every ALIGND_CYCLE_SECONDS)
"""
