"""Developer tools (not part of the installed package): the demo run and the example PyTorchJobs in jobs/."""
