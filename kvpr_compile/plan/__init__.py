"""Planning: the hardware profile, the cost model, the LPs that choose l (latency: latency_lp.py,
its Plan in latency_plan.py and the backend's cached ratios in latency_ratios.py; throughput:
throughput_lp.py), the task graphs that check them, and the tables that print them."""
