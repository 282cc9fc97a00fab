"""recdistill: distil an LLM sequential recommender into small, fast students."""

__version__ = "0.1.0"
