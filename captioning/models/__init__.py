"""Caption networks: the variant registry, the four families, their layers, saving and loading."""
