"""The console's pages, one module per page (or family of pages); `create_app` routes
to them.

- `streams.py`: the streams of a store, one stream, its state at a version, the global log.
- `live.py`: the live log, as server-sent events.
- `traces.py`: a correlation id's causation tree.
- `projections.py`: projections, their lag charts and rebuilds; the Prometheus metrics.
- `dead_letters.py`: the broker's dead letters, replaying them, and the consumer groups.
"""
