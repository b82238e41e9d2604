"""PyTorch adapter for psd_core (torch.optim.Optimizer subclasses). Filled by the psd_torch issue."""
