"""The ground of alignd: what every other package may import and what imports nothing of alignd itself.

- `core.config`: the one settings object (`get_settings()`), read from `ALIGND_*` variables;
- `core.redis_server`: the embedded redis-server started when no `ALIGND_REDIS_URL` is set;
- `core.names`: Celery task names and queues, shared by the workers that define them and the API and CLI that
  send them.

The layers above it (`pyproject.toml`, `[tool.importlinter]`, checked in CI by `lint-imports`):
`alignd` (entry points) → `service` | `workers` → `store` | `training` → `core`.
"""
