"""The Flickr8k captioning library behind the top-level stage scripts.

Modules import one way only, lower layers first:
    utils      errors, atomic writes, JSON, checksums, quiet logs, progress bars (no TensorFlow)
    text       caption cleaning, tokenizer.json/meta.json and the other prepare_text outputs
    features   the features files: pooled pickle (restricted loader), spatial HDF5
    images     image files -> RGB arrays (EXIF, modes, resize)
and above them the encoders, models, decoding, metrics and the applications. Retrieval
(issue 13): ranking and vector_index (numpy only), retrieval (the VSE++ embedding, above text),
caption_scoring (a captioner as a ranker, above models).
"""
