"""models/wan."""
