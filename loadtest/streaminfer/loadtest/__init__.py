"""Load generator for the streaminfer server: real-time streams over the client SDK, measured without coordinated omission."""

__version__ = "0.1.0"
