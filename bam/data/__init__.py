"""Text to tokens: domain sources, the tokenizer, tokenized shards with their splits, training and
evaluation batches, and the built-in corpus."""
