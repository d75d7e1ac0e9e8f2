"""The algorithm, with no transformers import: configuration, budgets, selection (DESIGN 2.1),
calibration over measured layers (2.2), the Profile, retrieval heads, the error bound (2.5) and
the run statistics. Data flows down: the integration calls core; core calls nothing of ours but itself."""
