"""Planning for the throughput schedule: its task graph and its LP."""
