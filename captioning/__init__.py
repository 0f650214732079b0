"""The captioning library: code the stage scripts share (features, text, models, retrieval)."""
