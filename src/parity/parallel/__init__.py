"""Parallel execution helpers: an in-repo tensor-parallel Llama (:mod:`parity.parallel.tp_llama`)."""
