"""Model tools: `raykit mix` (weighted model merging) and model cards."""
