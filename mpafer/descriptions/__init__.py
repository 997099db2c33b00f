"""Shipped multi-granularity class descriptions (JSON), the prompt that produced them, and the
script that regenerates them (`python -m mpafer.descriptions.generate`)."""
