"""Per-family recipe files (TOML), installed as the ``normswap.recipes`` data package."""
