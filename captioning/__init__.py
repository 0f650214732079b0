"""The Flickr8k captioning library behind the top-level stage scripts."""
