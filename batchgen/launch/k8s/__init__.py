"""Kubernetes launch: PyTorchJob rendering, a job backend over the API server, and the run controller.

Nothing here imports torch: the controller runs on a laptop or as a small in-cluster Job.
"""
