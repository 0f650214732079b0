"""serve.py's search view: a sentence -> the closest dataset images, through a train_retrieval.py
model (VSE++, captioning/retrieval/vse.py).

ImageSearch is the `retrieval` object that captioning.apps.webapp.create_app expects:
    .search(text, top_k) -> [{"image_id", "score" (cosine), "captions" (the image's own)}]
    .describe()          -> what the page shows about the loaded model.
Every image of the features file is embedded once, when the server starts (a dense projection:
about a second for Flickr8k's 8091 images on 2 cores); a query then costs one text-encoder call
and one index search (captioning/retrieval/vector_index.py).
"""
from pathlib import Path

import numpy as np

from captioning.retrieval import vse

from captioning.retrieval import vector_index
from captioning.data.features import load_features
from captioning.data.text import load_descriptions
from captioning.utils import PipelineError

CAPTIONS_SHOWN = 5          # a Flickr8k image has 5 captions; the page shows them under the hit


class ImageSearch:
    def __init__(self, model_dir, features_path, data_dir=None, index="auto"):
        """model_dir: train_retrieval.py run folder. features_path: {image_id: vector} pickle of
        the images to search (the backbone the model was trained on; width checked). data_dir:
        its tokenizer.json must be the model's (default the data_dir in model.json); its
        descriptions.txt, if there, gives each hit's captions."""
        model, self.config, self.tokenizer = vse.load_embedding(model_dir, data_dir)
        table = load_features(features_path)
        self.ids = sorted(table)
        if not self.ids:
            raise PipelineError(f"no images in {features_path}")
        width = len(table[self.ids[0]])
        if width != self.config["feature_dim"]:
            raise PipelineError(
                f"retrieval model {model_dir} was trained on {self.config['feature_dim']}-d features "
                f"(backbone {self.config.get('backbone')}) but {features_path} holds {width}-d ones")
        vectors = np.stack([np.asarray(table[i], np.float32) for i in self.ids])
        del table
        self.index = vector_index.make_index(
            vse.embed_images(vse.image_encoder(model), vectors), index)
        self.text_encoder = vse.text_encoder(model)
        self.model_dir, self.features_path = Path(model_dir), Path(features_path)
        folder = Path(data_dir if data_dir is not None else self.config.get("data_dir", ""))
        descriptions = folder / "descriptions.txt"
        self.captions = load_descriptions(descriptions) if descriptions.is_file() else {}

    def search(self, text, top_k):
        """The top_k images for `text`, best first. PipelineError for an empty query or one with
        no word in the vocabulary (the page shows its message)."""
        ids, _unknown = vse.encode_query(text, self.tokenizer, self.config["max_length"])
        query = vse.embed_captions(self.text_encoder, [ids])
        scores, rows = self.index.search(query, min(top_k, len(self.ids)))
        return [{"image_id": self.ids[row], "score": float(score),
                 "captions": list(self.captions.get(self.ids[row], []))[:CAPTIONS_SHOWN]}
                for score, row in zip(scores[0], rows[0])]

    def describe(self):
        return {"model": str(self.model_dir), "backbone": self.config.get("backbone"),
                "images": len(self.ids), "features": self.features_path.name,
                "index": self.index.backend}
