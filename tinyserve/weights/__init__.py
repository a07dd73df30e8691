"""Model weights: the registry of embedded models, download/cache, and loading."""
