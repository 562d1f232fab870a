"""Model card templates, installed as the package data `selmix_hf.model_cards` (see pyproject.toml)."""
