"""Generated code for the streaminfer.v1 API. Regenerate with ``make protos``."""
