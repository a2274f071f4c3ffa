"""The application layer: aggregates, repositories, commands, projections, process managers."""
