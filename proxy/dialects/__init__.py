"""Inbound dialects other than chat completions: each turns its requests into chat requests and the chat answers back."""
