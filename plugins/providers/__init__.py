"""Provider adapters: turn a context into an upstream request and the answer back into OpenAI's shape."""
