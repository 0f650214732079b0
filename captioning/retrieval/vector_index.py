"""Cosine top-k search over a fixed set of vectors: numpy, or faiss behind the same interface.

Owns: NumpyIndex, FaissIndex, make_index. Reads and writes no files (callers cache vectors).

Both normalise the vectors they are given (rows with norm 0 stay 0) and score by inner
product, which is then the cosine similarity. search(queries, k) returns (scores (Q, k) float32,
rows (Q, k) int64), best first; k is cut to the number of vectors. Rows are positions in the
order the vectors were added. Ties are broken by the lower row in NumpyIndex; faiss orders
exact ties its own way, so the two agree on top-k up to exact ties.

numpy is the default: one matrix-vector product over 8091 x 512 floats takes about a
millisecond. faiss (pip install faiss-cpu) is for collections of millions (an exact flat index
here; its approximate indexes plug in the same way).
"""
import numpy as np

from captioning.utils import PipelineError

BACKENDS = ("auto", "numpy", "faiss")
FEW_QUERIES = 8     # up to this many queries per call are scored one by one without BLAS


def normalize_rows(vectors):
    """float32 copy with every row scaled to unit L2 norm (zero rows stay zero)."""
    vectors = np.array(vectors, dtype=np.float32, ndmin=2)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def faiss_available():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class NumpyIndex:
    """Exact cosine search with one matrix product and argpartition."""

    backend = "numpy"

    def __init__(self, vectors):
        self.vectors = normalize_rows(vectors)

    def __len__(self):
        return len(self.vectors)

    def search(self, queries, k):
        queries = normalize_rows(queries)
        k = min(int(k), len(self.vectors))
        if len(queries) <= FEW_QUERIES:
            # a matrix-vector product is memory-bound; numpy's einsum loop does it without BLAS
            # threads, which on a busy 2-core CPU took 20 ms instead of 0.7 ms (8091 x 512)
            scores = np.stack([np.einsum("nd,d->n", self.vectors, q) for q in queries])
        else:
            scores = queries @ self.vectors.T                    # (Q, N), BLAS
        if k < scores.shape[1]:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        rows = np.empty((len(queries), k), dtype=np.int64)
        for q in range(len(queries)):
            cand = np.sort(part[q])      # rows ascending, so the stable sort keeps the lower row on ties
            rows[q] = cand[np.argsort(-scores[q, cand], kind="stable")]
        return np.take_along_axis(scores, rows, axis=1).astype(np.float32), rows


class FaissIndex:
    """Exact cosine search with faiss.IndexFlatIP on the normalised vectors."""

    backend = "faiss"

    def __init__(self, vectors):
        import faiss
        vectors = normalize_rows(vectors)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def __len__(self):
        return self.index.ntotal

    def search(self, queries, k):
        k = min(int(k), self.index.ntotal)
        scores, rows = self.index.search(normalize_rows(queries), k)
        return scores.astype(np.float32), rows.astype(np.int64)


def make_index(vectors, backend="auto", faiss_from=100_000):
    """An index over `vectors`: numpy, faiss, or auto (faiss from `faiss_from` vectors if installed).

    Why the threshold: below ~100k vectors numpy's exact product is already a few ms, and a
    missing optional package should not change results for the common case.
    """
    if backend not in BACKENDS:
        raise PipelineError(f"unknown index backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "faiss" and not faiss_available():
        raise PipelineError("index backend faiss requested but faiss is not installed "
                            "(pip install faiss-cpu)")
    if backend == "faiss" or (backend == "auto" and len(vectors) >= faiss_from and faiss_available()):
        return FaissIndex(vectors)
    return NumpyIndex(vectors)
