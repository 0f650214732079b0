"""Image-sentence retrieval: the VSE++ embedding, ranking, the vector index, image search."""
