"""The run's orchestration: the driver's loop, placement on Ray, recovery from lost actors, the
weight hand-over to rollout actors and the prompt stream."""
