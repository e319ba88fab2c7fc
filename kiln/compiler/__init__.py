"""From a loaded transformers model to a saved, compiled engine program."""
