"""remp: an LLM inference server whose parallel layout is runtime state."""

__version__ = "0.1.0"
