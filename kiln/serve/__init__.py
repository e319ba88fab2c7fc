"""kiln's OpenAI-compatible server: `kiln serve`."""
