"""Test-time query refinement (arXiv 2605.12487): POST /v1/refine-query, its teachers, and stored corpora."""
