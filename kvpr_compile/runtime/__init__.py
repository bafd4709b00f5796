"""Runtime of compiled graphs: the CPU store, the kvpr:: custom ops, the recompute runner."""
