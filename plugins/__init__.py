"""Built-in pipeline stages and provider adapters, registered as entry points."""
