"""Configuration: the TOML reader, its typed values and the validation."""
