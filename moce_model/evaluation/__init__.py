"""Benchmark evaluation of base and MoCE models: sandboxed code execution, cluster-routed lm-eval model,
demo and paper benchmark sets, result tables and the comparison report."""
