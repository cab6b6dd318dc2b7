"""Layer 3: the fine-tuning workflow (`run_training`) and what it writes to disk."""
