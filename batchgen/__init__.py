"""batchgen: offline batch video generation with Mochi 1 and Unified Sequence Parallelism."""

__version__ = "0.1.0"
