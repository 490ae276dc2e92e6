"""The worker: the loop every rank runs (``loop``), the launch contract (``contract``) and the process context.
Imports no torch at module level; the generator and torch.distributed are loaded only when a worker runs.
"""
