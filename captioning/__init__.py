"""The Flickr8k captioning library behind the top-level stage scripts.

Modules import one way only, lower layers first (README, "Code layout"):
    utils             errors, atomic writes, JSON, checksums, quiet logs, progress bars (no TensorFlow)
    text              caption cleaning, tokenizer.json/meta.json and the other prepare_text outputs
    features          features.pkl (restricted unpickler); spatial: the HDF5 grid file
    images            image files -> RGB arrays (EXIF, modes, resize)
    torch_checkpoint  legacy PyTorch checkpoints read without torch (restricted)
    efficientnet_lite EfficientNet-Lite0/1/2 in Keras; encoders: the VGG16/Lite0 table
    models, data      caption model builders (VARIANTS), batching
    decoding          greedy, beam search, one step function per variant (STEP_BUILDERS)
    metrics           BLEU (two modes) and diagnostics; coco_metrics: METEOR, ROUGE-L, CIDEr-D
    training, scst    the epoch loop with atomic checkpoints; self-critical training
    captioner         a trained model + vocabulary + encoder, for the applications:
    video, webapp, web_captioner   caption_video.py and serve.py
    retrieval, ranking, vector_index, caption_scoring   image-sentence retrieval and search
"""
