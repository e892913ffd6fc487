"""models/ar."""
