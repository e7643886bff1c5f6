"""Model preparation: resolving ids and paths, the cache folder, GGUF conversion."""
