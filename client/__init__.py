"""saelect client package."""
