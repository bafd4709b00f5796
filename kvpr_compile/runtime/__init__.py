"""Runtime of compiled graphs: the CPU store, the kvpr:: ops' bodies (kernels.py), the CUDA
runtime, and the lowered graph with what runs it (lower.py, piecewise.py, the column cut and its
runner). It imports ops/ (and plan/, report), never passes/."""
