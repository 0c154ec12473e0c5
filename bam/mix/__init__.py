"""Weights from weights: branching a seed, mixing dense experts into an MoE tensor by tensor, adding
an expert to a mixture, and the Nexus domain embeddings."""
