"""Everything alignd keeps in Redis: completion log, feedback log, derived comparisons, export/import, the model
registry and locks. This package is the only place that knows Redis key names (`store.keys`)."""
