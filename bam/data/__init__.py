"""Text to tokens, in the order the data flows: sources.py (domains: named streams of documents) ->
shards.py (each document hashed into train/validation/test, tokenized, cached on disk) -> batches.py
(the training mixture and the evaluation windows). tokenizer.py trains and loads the tokenizer;
corpus.py is the demo's built-in corpus."""
