"""certify package."""
