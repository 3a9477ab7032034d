"""saelect service package."""
