"""A trained captioner at work: decoding (greedy, beam), the Captioner, ensembles, consensus
re-ranking of a beam's captions, attention maps."""
