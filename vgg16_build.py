"""Stage 1: VGG16 (configuration D) built layer by layer, and its fc2 feature extractor.

Usage:
    python vgg16_build.py                      # ImageNet weights (downloaded once into Keras's cache)
    python vgg16_build.py --weights none --summary
    python vgg16_build.py --weights path/to/vgg16_weights_tf_dim_ordering_tf_kernels.h5
    python vgg16_build.py --weights path/to/vgg16_exported.json   # the course's .json/.h5 pair
    python vgg16_build.py --weights imagenet --export models/vgg16

The network, layer by layer, is captioning/encoders/vgg16.py (build_vgg16): 13 3x3 convolutions
in five blocks (BLOCKS), five max-pools, flatten (7*7*512 = 25088), fc1 and fc2 (4096 each), the
1000-way softmax. `--summary` prints it. Files read and written: that module's docstring.
"""
import argparse
import os
import sys

from captioning.encoders.vgg16 import (  # noqa: F401 (re-exported: the course imports them from here)
    BLOCKS, CLASSES, EXPORT_NAME, FC_UNITS, FEATURE_LAYER, IMAGE_SIZE, IMAGENET_FILE, IMAGENET_MD5,
    IMAGENET_URL, SEED, WEIGHTS, build_feature_extractor, build_vgg16, export_model, load_weights,
    resolve_weights, truncate_at)
from captioning.utils import HelpFormatter, run_cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--weights", default=WEIGHTS,
                        help="imagenet (official file, cached by Keras), none (random), or PATH "
                             "to a VGG16 .h5 or the course's vgg16_exported.json")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the random initialisation")
    parser.add_argument("--cache-dir", default=None,
                        help="Keras cache folder for --weights imagenet (default: $KERAS_HOME or "
                             "~/.keras; the file goes in its models/ sub-folder)")
    parser.add_argument("--summary", action="store_true", help="print the Keras layer summary")
    parser.add_argument("--export", metavar="DIR", default=None,
                        help=f"write DIR/{EXPORT_NAME}.json and DIR/{EXPORT_NAME}.h5")
    args = parser.parse_args(argv)

    path = resolve_weights(args.weights, cache_dir=args.cache_dir)
    full = build_vgg16(seed=args.seed)
    source = load_weights(full, path)
    extractor = truncate_at(full, FEATURE_LAYER)
    if args.summary:
        full.summary()
    print(f"VGG16: {len(full.layers)} layers, {full.count_params():,} parameters; weights: {source}")
    print(f"feature extractor (up to {FEATURE_LAYER}): {extractor.count_params():,} parameters, "
          f"output {tuple(extractor.output.shape)}")
    if args.export:
        json_path, h5_path = export_model(full, args.export)
        print(f"exported {json_path} and {h5_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
