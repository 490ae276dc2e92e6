"""What every model family shares: the staged generator, weights loading helpers, compile, FP8, cache, memory, VAE."""
