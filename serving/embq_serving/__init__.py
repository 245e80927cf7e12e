"""embq's serving plugin: load an embq artifact and answer predictions (see issue: serving)."""
