"""The alignd API: OpenAI-compatible chat, feedback, admin, metrics and pages, plus the generation engine
(batching, versions, hot-swap). Imports `training` and `store`; never `workers`."""
