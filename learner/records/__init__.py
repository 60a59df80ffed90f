"""The run's records: its directory, checkpoints, trackers, dashboard metrics and the report."""
