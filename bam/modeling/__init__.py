"""The model and what is known from its config alone: BamConfig, the parameter layout, attention,
the MoE FFN, the losses, costs and presets. Reads no files.

Tensor names end in their shape, one letter per dimension, each letter meaning one thing in every
module of bam (`h_BTD` is [batch, positions, hidden]):

    B  batch                        E  experts (FFN or attention)
    T  positions of the tokens fed  K  routed choices per token (top-k)
       in (queries); flattened B*T  R  (token, choice) pairs, sorted by expert
       where there is no B          F  one FFN expert's hidden width
    S  key/value positions (the     V  vocabulary
       cache's and this call's)     C  rows of one chunk of the loss
    D  hidden size                  M  domain-embedding width (Nexus)
    H  attention heads in one call  P  hidden width of the Nexus projection
    A  width of one attention head  I, O  in and out width of one matmul
    G  RoPE's rotation pairs (A/2)
"""
