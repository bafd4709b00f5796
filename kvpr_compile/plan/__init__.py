"""Planning: the hardware profile, the cost model, the LPs that choose l (latency: scheduler.py;
throughput: throughput_lp.py), the task graphs that check them, and the tables that print them."""
