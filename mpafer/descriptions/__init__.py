"""Shipped multi-granularity class descriptions (JSON), their generation prompt and regeneration script."""
