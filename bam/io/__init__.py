"""Files, independent of what they hold: atomic output directories and their temporaries, sha256
manifests, the lazy safetensors reader and the streaming safetensors writer. Imports nothing of bam
but errors."""
