"""Check a local Flickr8k / Flickr30k / COCO copy against its Karpathy split file, or say where the official files live.

Usage:
    python check_dataset.py --where coco
    python check_dataset.py --karpathy-json caption_datasets/dataset_coco.json --images-root data/coco
    python check_dataset.py --karpathy-json dataset_flickr8k.json --images-root data/flickr8k/Flicker8k_Dataset

--where NAME prints the download addresses and the published counts (captioning/data/datasets.py;
they could not be downloaded on the machines this project is built on).

--karpathy-json FILE reads dataset_flickr8k.json, dataset_flickr30k.json or dataset_coco.json
and prints a line per Karpathy split (count, and whether it is the published one); with
--images-root DIR (COCO: the folder holding train2014/ and val2014/; Flickr: the folder of the
JPEGs) also a line per image folder, a summary, and one `missing: PATH` line per image the JSON
lists that is not there. Files the JSON does not list are counted, not errors (Karpathy's
Flickr30k lists 31,014 of the 31,783 images).

Exit status: 0 when the counts are the published ones and no image is missing, 2 when not,
1 with one `error: ...` line for a file that cannot be read (malformed JSON, unknown split,
an image without captions, a duplicate id).
"""
import argparse
import sys

from captioning.data import datasets
from captioning.utils import HelpFormatter, PipelineError, run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--where", choices=sorted(datasets.DATASETS),
                        help="print where the official files of this dataset live, and its counts")
    parser.add_argument("--karpathy-json", metavar="FILE",
                        help="dataset_flickr8k.json, dataset_flickr30k.json or dataset_coco.json")
    parser.add_argument("--images-root", metavar="DIR",
                        help="where the images are (COCO: the folder holding train2014/ and val2014/)")
    parser.add_argument("--dataset", choices=sorted(datasets.DATASETS),
                        help="which published counts to compare with (default: the JSON's "
                             "\"dataset\" field)")
    args = parser.parse_args(argv)
    if args.where:
        print("\n".join(datasets.source_lines(args.where)))
        if not args.karpathy_json:
            return 0
    if not args.karpathy_json:
        raise PipelineError("pass --karpathy-json FILE (and --images-root DIR), or --where NAME")
    result = datasets.check(args.karpathy_json, args.images_root, args.dataset)
    ok, lines = datasets.report_lines(result)
    print("\n".join(lines))
    print("ok" if ok else "problems found (see the lines above)")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(run_cli(main, tensorflow=False))
