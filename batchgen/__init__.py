"""batchgen: offline batch video generation (Mochi, Wan) with Unified Sequence Parallelism."""

__version__ = "0.1.0"
