"""Measuring a model: held-out perplexity, generation, and lm-evaluation-harness tasks. Below train,
since training evaluates."""
