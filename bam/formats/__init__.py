"""Model directories on disk: opening any supported source (ours, Hugging Face families) as a stream
of tensors in our layout, loading and saving models, and exporting to other layouts."""
