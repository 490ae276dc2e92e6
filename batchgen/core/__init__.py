"""The facts every other package shares: errors, object keys (layout), the item and its records, the one
configuration tree, manifest, shard plan, progress scan and parallel topology. Imports no torch and no kubernetes.
"""
