"""models/shapes."""
