"""Wan 2.1 / 2.2 (Wan-AI): loading (diffusers and official layouts), generator, USP processors, tiny model."""
