"""Mochi 1 (genmo/mochi-1-preview): loading, generator, joint attention, tiny model."""
