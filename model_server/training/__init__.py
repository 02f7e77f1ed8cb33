"""Training gircse adapters with Iterative Contrastive Refinement (ICR, arXiv 2509.24291).

`config` (no torch: the CLI imports it), `data` (Debian pairs, Lee evaluation data), `icr` (the
loss, the differentiable soft-token rollout and the training loop).
"""
