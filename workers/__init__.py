"""saelect workers package."""
