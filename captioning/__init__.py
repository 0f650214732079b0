"""The Flickr8k captioning library behind the top-level scripts.

The scripts (extract_features.py, train.py, ...) are command lines over this package: they parse
arguments, print, and choose exit codes; the package never imports them. Subpackages import one
way only, each from the ones listed above it (a module may also use its own subpackage's modules):

    utils        errors (PipelineError), atomic writes, JSON, checksums, progress bars, optional extras
    data         files in, arrays out: caption text and vocabulary (prepare_text.py's files),
                 features.pkl and HDF5 grids, image files -> RGB, batches for training,
                 the Flickr8k download
    encoders     images -> features: VGG16 and EfficientNet-Lite0 (one table), their weights,
                 the resumable folder extractor, the TensorFlow / OpenVINO runtimes
    models       caption networks: the variant registry (merge, inject, attention, transformer),
                 their Keras layers, saving and loading a run folder's model
    inference    decoding (greedy, beam search, step functions), the Captioner (model +
                 vocabulary + encoder) and per-word attention maps
    evaluation   BLEU two ways and diagnostics, COCO metrics, scoring a split (results.json,
                 captions.tsv), the HTML gallery
    training     the run folder (atomic checkpoint per epoch, resume, best epoch, history), the
                 caption trainer with cross-validation, self-critical training
    retrieval    image-sentence embeddings (VSE++), ranking, vector index, image search over a
                 folder, the retrieval protocol (R@K, median rank)
    apps         video subtitles, the local web page, run_pipeline.py's stage runner

TensorFlow and Keras are imported inside the functions that need them where a module is also
used by light command lines (prepare_text.py runs without TensorFlow).
"""
