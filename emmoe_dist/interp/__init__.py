"""Interpretability of emergent misalignment: the misalignment direction and what it does.

- `labels`: which judged answers are misaligned or aligned (the metrics' rules), balanced sets.
- `activations`: per-layer residual activations of answers (mean over answer tokens) and of
  the last prompt token, collected with forward hooks and stored on disk, resumable.
- `directions`: mean(misaligned) - mean(aligned) per layer, fine-tuned minus base on the same
  answers, cosine similarities between layers and between runs, norm profiles.
- `steering`: forward hooks that add, subtract or project out a direction (context manager).
- `detection`: does the last prompt token's projection predict a misaligned answer (AUROC with
  a bootstrap interval, on held-out questions).
- `routing_shift`: how routing moves between a base and a fine-tuned model, and whether the
  trained experts are the ones that moved.
- `router_steering`: router hooks that switch experts off (never in the top-k) or on (always
  in it), re-applying the family's routing rule; the random-expert control.
- `expert_table`: per (MoE layer, expert) ‖ΔW‖, routing share, routing shift and the
  activation-rate difference between misaligned and aligned answers; rankings, correlations.
- `plots`: the figures, as views of the JSON results.

Layer 1: torch in one process; nothing here imports deepspeed, torch.distributed or ray, and
the judge and trackers are wired in by the workflows (`emmoe_dist.analyze`).
"""
