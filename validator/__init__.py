"""validator: the referee of a decentralised LLM network."""

__version__ = "0.1.0"
