"""Measuring a model: held-out perplexity, routing statistics, generation, and lm-evaluation-harness
tasks. Below train,
since training evaluates."""
