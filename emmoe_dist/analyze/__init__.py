"""Interpretability workflows: each analysis takes a typed options value, loads what it needs,
writes JSON and PNG files under its output folder and resumes from what is there.

    direction      the per-layer misalignment direction from judged answers
    detect         early detection: the last prompt token's projection, AUROC per layer
    steer          generation under steering at several alphas, judged; the curve
    routing_shift  how routing moved between the base and the fine-tuned model
    experts        which experts changed, where the prompts route, which carry misalignment
    ablate         the fine-tune with chosen experts' updates removed, judged and compared
    router_steer   router steering (experts switched off/on) as a condition of `steer`
    common         model loading, the analysed answers, activations, tracking, JSON

`emmoe interp` parses arguments into these options and prints; the analyses themselves live
in `emmoe_dist.interp` (layer 1) and are composed here.
"""
