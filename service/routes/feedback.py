"""POST /v1/feedback: thumbs, pairwise or rank feedback on a completion this server returned (store/feedback.py).

201 with {"id", "object": "feedback", "completion_id", "type", "revision", "created"} when accepted; 200 with the
same body when a retry reuses the `feedback_id` of an accepted request; errors in the OpenAI shape.
"""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service import metrics
from service.deps import CallerDep, StateDep
from service.errors import APIError, redis_unavailable_message
from store import feedback as fb

router = APIRouter(prefix="/v1", tags=["feedback"])

_STATUS = {
    fb.CompletionNotFound: 404,
    fb.NotYourCompletion: 403,
    fb.InvalidFeedback: 422,
    fb.FeedbackIdConflict: 409,
    fb.FeedbackRateLimited: 429,
}


@router.post("/feedback", status_code=201)
async def create_feedback(body: fb.FeedbackIn, state: StateDep, caller: CallerDep) -> JSONResponse:
    """Record one vote; a second vote of the same user on the same completion and slot revises the first."""
    s = state.settings
    limits = fb.FeedbackLimits(
        per_minute=s.feedback_rate_per_minute,
        per_day=s.feedback_daily_cap,
        max_comment_chars=s.max_comment_chars,
        key_per_minute=s.key_feedback_rate_per_minute,
        key_per_day=s.key_feedback_daily_cap,
        key_annotators=s.key_annotators_per_day,
        records_ttl_s=s.feedback_records_ttl_s,
    )
    try:
        accepted = await fb.asubmit_feedback(
            state.aredis, body, user=caller.user, is_admin=caller.is_admin, trusted=caller.annotator, limits=limits
        )
    except fb.FeedbackError as exc:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, fb.FeedbackRateLimited) else None
        raise APIError(_STATUS[type(exc)], exc.message, exc.code, exc.param, headers) from None
    except redis.RedisError as exc:  # outcome unknown: a retry with the same id settles it
        raise APIError(
            503,
            f"{redis_unavailable_message(exc)}; retry with the same feedback_id",
            "redis_unavailable",
            headers={"Retry-After": "1"},
        ) from None
    if not accepted.replayed:
        metrics.FEEDBACK.labels(type=body.type).inc()
    return JSONResponse(accepted.response(), status_code=200 if accepted.replayed else 201)
