"""Layer 2: everything that knows about several processes (torch.distributed, DeepSpeed)."""
