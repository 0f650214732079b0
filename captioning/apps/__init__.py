"""Applications over a trained captioner: video subtitles and the local web page."""
