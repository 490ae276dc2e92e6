"""Starting workers: ``local`` (torchrun processes on this machine) and ``k8s`` (PyTorchJob / TrainJob rendering, the
job backend over the API server and the run controller). Imports no torch.
"""
