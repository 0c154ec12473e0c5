"""Weights from weights: branching a seed, mixing dense experts into an MoE tensor by tensor, adding
an expert to a mixture, and the Nexus domain embeddings.

    branch.py       one copy of the seed per expert domain
    rules.py        which rule builds each output tensor, and the pure functions that implement them
    mixing.py       the mixed config, the checks on the sources, and the streaming `mix`
    add_expert.py   one more dense expert appended to a mixture
    nexus.py        the fixed domain embeddings a Nexus router projects
    extend.py       `bam add-expert`: embed the new domain, add its expert, finetune briefly
    provenance.py   mix.json, how a mixed model was made
"""
