"""Caption networks: one registry over four families, their Keras layers, saving and loading.

    registry.py     VARIANTS, one entry per family (input kind, builder, step builder, options);
                    building from model.json, compiling, a run folder's model.keras + model.json
    lstm.py         merge (the tutorial's) and inject, on pooled features (N, D)
    attention.py    Show, Attend and Tell soft attention, on spatial grids (N, G, C)
    transformer.py  a Transformer encoder over grid cells and a causal decoder over words
    layers.py       the custom Keras layers of the grid families (registered by name)
    loss.py         the caption loss (registered by name)

Imports go one way: layers.py and loss.py <- the family modules <- registry.py.
"""
