"""A trained captioner for applications (photos, video frames, web uploads, search): load once, caption many.

Owns the Captioner class:
    captioner = Captioner("models/merge")            # the run folder, or its model.keras
    captioner.caption_features(features (N, D), beam=1)   -> N caption strings
    captioner.caption_words(features, beam=3)              -> N word lists
    captioner.caption_images([PIL RGB images])             -> N caption strings
    captioner.attention_maps(features, id_lists)           -> N (L, H, W) maps (grid models)
It loads the run folder (model.keras + model.json) and the tokenizer (data_dir, default the one
recorded in model.json), checks they belong together (vocabulary size, tokenizer sha256, output
width), and decodes through captioning.inference.decoding (greedy for beam 1; beam search with length
normalisation `alpha` for beam >= 2). Images become features through an injected
`encode(list of PIL RGB images) -> float32 (N, D)` callable ((N, G, C) grids for the
attention/transformer models); the default is the pooled (or spatial) extractor of the backbone
the model's features came from (model.json's "backbone", else the
one whose width matches: 4096 VGG16 fc2, 1280 Lite0). An encoder may carry a `width`
attribute, checked against the model's feature_dim before any image is encoded.
A model trained with a fine-tuned encoder top (train.py --finetune-top, model.json
"encoder_top") reads trunk files instead of grids (read_features: top(trunk), then the
captioner), and its default encoder for photos is the whole Lite0 network with the fine-tuned
top copied in (finetuned_encoder), so photos and cached trunk maps go through the same weights.
Reads the run folder and tokenizer.json; writes nothing.
"""
from pathlib import Path

import numpy as np

from captioning.encoders import extract
from captioning.inference import decoding
from captioning.encoders import backbones
from captioning.encoders import efficientnet_lite
from captioning.models import finetune, registry
from captioning.data.features import check_features, read_rows
from captioning.data.images import RESIZE_FILTER, resize_rgb
from captioning.encoders.runtime import RUNTIME, make_predict_fn
from captioning.utils import PipelineError, sha256_file

WEIGHTS = "imagenet"    # VGG16 weights of the default encoder: imagenet | none | path to .h5/.keras
# The captioner shipped in the repository (soft attention trained with Lite0's last block, then
# SCST on CIDEr-D; the top and the tokenizer beside it), so `python generate_caption.py
# photo.jpg` works out of the box; the scripts' default --model. pretrained/attention-lite0-scst
# (frozen grid + SCST) and pretrained/merge-lite0 (pooled features) also ship: with it, the best
# ensemble (docs/stages.md). pretrained/attention-lite0-ft is the default's starting point.
PRETRAINED_DIR = str(Path(__file__).resolve().parents[2] / "pretrained" / "attention-lite0-ft-scst")
DATA_DIR = None          # None: the tokenizer in the model folder, else model.json's data_dir


class KerasEncoder:
    """encode(list of PIL RGB images) -> float32 (N, D) through a Keras feature extractor.

    build() -> the Keras model (built on first use: tens of seconds for VGG16, so making an
    encoder costs nothing until it is used); size = its (height, width) input; preprocess(uint8
    array (N, H, W, 3)) -> its input scaling. `width` (D) is read from the built model, so a
    model/encoder mismatch is found before any image is encoded. Batches hold at most
    batch_size images (fewer for a short list: a few photos need not cost a full batch).
    """

    def __init__(self, build, size, preprocess, batch_size=extract.BATCH_SIZE,
                 spatial=False, runtime=RUNTIME, fingerprint=None):
        """spatial: the model outputs (N, h, w, C) grids, kept as (N, h*w, C). runtime,
        fingerprint: captioning.encoders.runtime.make_predict_fn's (auto: OpenVINO on a CPU when
        installed and equal to TF, cached under the weights' fingerprint; else TF)."""
        self.build, self.size, self.preprocess, self.batch_size = build, size, preprocess, batch_size
        self.spatial, self.runtime, self.fingerprint = spatial, runtime, fingerprint
        self._extractor = self._predict = self._width = None

    def _built(self):
        if self._extractor is None:
            self._extractor = self.build()
            self._width = int(self._extractor.outputs[0].shape[-1])
        return self._extractor

    def _ready(self):
        # the runtime (and a first OpenVINO conversion) only once images are to be encoded:
        # a width mismatch is found without it
        if self._predict is None:
            self._predict = make_predict_fn(self._built(), self.runtime, fingerprint=self.fingerprint)
        return self._predict

    @property
    def runtime_used(self):
        """What runs the network ("tf 2.21.0", "openvino 2026.4.1 CPU f32 THROUGHPUT for batches, LATENCY for one image", ...)."""
        return self._ready().description

    @property
    def width(self):
        self._built()
        return self._width

    def __call__(self, images):
        predict = self._ready()
        arrays = np.stack([resize_rgb(img, self.size) for img in images]) if images else None
        if arrays is None:
            return np.zeros((0, self._width), np.float32)
        x = self.preprocess(arrays.astype(np.float32))
        step = max(1, min(len(x), self.batch_size))
        shape = (-1, self._width) if self.spatial else (-1,)
        out = [predict(x[i:i + step]).reshape(len(x[i:i + step]), *shape) for i in range(0, len(x), step)]
        return np.concatenate(out).astype(np.float32)


def backbone_encoder(backbone, weights=WEIGHTS, output="pooled", runtime=RUNTIME):
    """The encoder of `backbone` ("vgg16" or "lite0", captioning/encoders/backbones.py) with its resize
    and input scaling: what extract_features.py computes for the same picture. output "pooled"
    gives (N, D) vectors, "spatial" the (N, h*w, C) grids of extract_features.py --spatial."""
    encoder = backbones.get(backbone)

    def build():
        return backbones.build(backbone, None if weights == "none" else weights, output=output,
                              quiet=True)

    # extract_features.py's cache key for the same weights (the runtime's key adds the network's
    # structure, so pooled and spatial get one conversion each)
    fingerprint = f"{extract.weights_fingerprint(weights, extract.SEED, backbone)}; {backbone}"
    return KerasEncoder(build, encoder.image_size, encoder.preprocess, spatial=output == "spatial",
                        runtime=runtime, fingerprint=fingerprint)


def finetuned_encoder(record, top, top_file, runtime=RUNTIME):
    """The grid encoder of a fine-tuned model: the whole network of model.json's encoder_top
    `record` (the lower part's weights the trunk file was made with) with the fine-tuned `top`
    copied in by layer name, so a photo gets the grid top(lower(photo)) that cached trunk maps
    get. top_file: the top's .keras file, whose sha256 keys the runtime's conversion cache."""
    if record.get("resize_filter", RESIZE_FILTER) != RESIZE_FILTER:
        raise PipelineError(f"the fine-tuned top was trained on maps of images resized with "
                            f"{record['resize_filter']}; photos are resized with {RESIZE_FILTER} "
                            f"({top_file})")
    backbone = record["backbone"]
    encoder = backbones.get(backbone)
    weights = None if record["weights"] == "none" else record["weights"]

    def build():
        full = backbones.build(backbone, weights, seed=int(record["seed"]), output="spatial",
                               quiet=True)
        efficientnet_lite.copy_weights(top, full)
        return full

    fingerprint = f"{record['fingerprint']}; {backbone} fine-tuned top sha256={sha256_file(top_file)}"
    return KerasEncoder(build, encoder.image_size, encoder.preprocess, spatial=True,
                        runtime=runtime, fingerprint=fingerprint)


def vgg16_encoder(weights=WEIGHTS):
    """The VGG16 fc2 encoder (the tutorial's)."""
    return backbone_encoder("vgg16", weights)


class Captioner:
    """A trained caption model with its vocabulary, checked to belong together."""

    def __init__(self, model_path, data_dir=None, encode=None):
        """model_path: a train.py run folder or its model.keras; data_dir: prepare_text.py's
        folder holding tokenizer.json (default: the run folder itself when it carries its
        tokenizer.json, as the shipped pretrained/ captioner does, else the data_dir recorded
        in model.json);
        encode: see the module docstring (default vgg16_encoder(), built on first use)."""
        run_dir = registry.run_folder(model_path)
        if data_dir is None:
            data_dir = (run_dir if (run_dir / "tokenizer.json").is_file()
                        else registry.read_config(run_dir).get("data_dir"))
        self.model, self.config, self.tokenizer = registry.load_captioner(run_dir, data_dir)
        self.id_to_word, self.start_id, self.end_id, self.banned = decoding.vocabulary(self.tokenizer)
        self.encode = encode
        self.run_dir = run_dir
        self._step_fns = None
        # a checkpoint's last.keras (checkpoint averaging, resuming) pairs with the newest top
        self._top_last = Path(model_path).name == "last.keras"
        self._top = None

    @property
    def top(self):
        """The fine-tuned encoder top saved with the model (None for a frozen model)."""
        if self._top is None and self.config.get(finetune.KEY):
            self._top = finetune.load_top(self.run_dir, last=self._top_last, compile=False)
        return self._top

    def read_features(self, path, ids):
        """(found ids, float32 features) of `ids` in `path` as this model takes them: a
        fine-tuned model's grids are its top run over a trunk file's maps; a frozen model reads
        a pickle, features.npy or spatial grid file (read_rows). The wrong kind of file is a
        one-line PipelineError naming the model and the file (finetune.check_input_kind)."""
        finetune.check_input_kind(self.config, path, self.run_dir)
        if self.config.get(finetune.KEY):
            return finetune.model_features(self.config, self.top, path, ids, self.run_dir)
        found, matrix, _ = read_rows(path, ids)
        return found, matrix

    def readable(self, paths):
        """The features files of `paths` of the kind this model reads (trunk files for a
        fine-tuned model, the others for a frozen one); none: the first, whose read_features
        then says what is wrong."""
        tuned = bool(self.config.get(finetune.KEY))
        return [p for p in paths if finetune.is_trunk_file(p) == tuned] or list(paths)[:1]

    @property
    def feature_dim(self):
        return self.config["feature_dim"]

    def caption_ids(self, features, beam=decoding.BEAM, alpha=decoding.ALPHA, progress=False,
                    candidates=False):
        """(N, D) features -> N lists of generated ids (ending with endseq's id when finished);
        with candidates (beam >= 2), N n-best lists [(ids, score)] (decoding.beam_search)."""
        if self._step_fns is None:      # built once: every build traces new tf.functions
            self._step_fns = decoding.make_step_fn(self.model, self.config)
        return decoding.caption_features(self.model, self.config, self.tokenizer, features,
                                         beam, alpha, progress=progress, step_fns=self._step_fns,
                                         candidates=candidates)

    def words(self, ids):
        """Generated ids -> caption words, without endseq."""
        return decoding.ids_to_words(self.id_to_word, ids, self.end_id)

    def caption_words(self, features, beam=decoding.BEAM, alpha=decoding.ALPHA, progress=False):
        """(N, D) features -> N word lists, without the sentinels."""
        return [self.words(ids) for ids in self.caption_ids(features, beam, alpha, progress)]

    def caption_features(self, features, beam=decoding.BEAM, alpha=decoding.ALPHA, progress=False):
        """(N, D) features -> N caption strings."""
        return [" ".join(words) for words in self.caption_words(features, beam, alpha, progress)]

    @property
    def backbone(self):
        """The backbone this model's features came from (model.json, else by width), or None."""
        return backbones.backbone_of(self.config)

    def default_encoder(self, weights=WEIGHTS, runtime=RUNTIME):
        """The encoder of the model's own backbone (VGG16 when it cannot be told); its grid for
        the grid models. A fine-tuned model's is finetuned_encoder: its lower part's weights are
        the ones recorded in model.json (`weights` is not used)."""
        record = self.config.get(finetune.KEY)
        if record:
            return finetuned_encoder(record, self.top, finetune.top_path(self.run_dir, self._top_last),
                                     runtime)
        output = "spatial" if self.config.get("grid") else "pooled"
        return backbone_encoder(self.backbone or "vgg16", weights, output, runtime)

    def check_encoder(self):
        """The encoder (the model's own backbone if none was given), after checking its width."""
        if self.encode is None:
            self.encode = self.default_encoder()
        width = getattr(self.encode, "width", None)
        if width is not None and width != self.feature_dim:
            raise PipelineError(f"the model was trained on {self.feature_dim}-d features but the "
                                f"image encoder gives {width}-d ({self.run_dir})")
        return self.encode

    def caption_images(self, images, beam=decoding.BEAM, alpha=decoding.ALPHA):
        """PIL RGB images -> caption strings (encode, then caption_features)."""
        if not images:
            return []
        features = self.encode_images(images)
        return self.caption_features(features, beam, alpha)

    def encode_images(self, images):
        """PIL RGB images -> the features the model takes, checked: (N, D) or (N, G, C)."""
        features = np.asarray(self.check_encoder()(list(images)), dtype=np.float32)
        check_features(features.shape, self.config, f"the image encoder's output, {self.run_dir}")
        return features

    def attention_maps(self, features, id_lists):
        """Per-word attention of a grid model -> N arrays (L, H, W), L = the caption's words
        (endseq left out): the weights it used while choosing each word."""
        if not self.config.get("grid"):
            raise PipelineError(f"attention maps need an attention or transformer model, not "
                                f"{self.config.get('variant')} ({self.run_dir})")
        height, width = self.config["grid"]
        words = [self.words(ids) for ids in id_lists]
        longest = max((len(w) for w in words), default=0)
        padded = np.zeros((len(id_lists), max(longest, 1)), np.int64)
        for row, ids in enumerate(id_lists):
            padded[row, :len(words[row])] = ids[:len(words[row])]
        weights = decoding.attention_weights(self.model, np.asarray(features, np.float32),
                                             padded, self.start_id)
        return [weights[row, :len(w)].reshape(len(w), height, width) for row, w in enumerate(words)]
