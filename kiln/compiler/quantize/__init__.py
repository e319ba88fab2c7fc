"""Weight-only quantization at build: round-to-nearest (`rtn`), the methods a build may name (`methods`)."""
