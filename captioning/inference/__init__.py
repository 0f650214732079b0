"""A trained captioner at work: decoding (greedy, beam), the Captioner, attention maps."""
