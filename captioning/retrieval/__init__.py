"""Image-sentence retrieval: the VSE++ embedding and its trainer, ranking, the vector index, search."""
