"""What ships with the package: the real test models, texts, pre-calibrated profiles, a demo document."""
