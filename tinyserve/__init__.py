"""tinyserve."""
