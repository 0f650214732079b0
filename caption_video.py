"""Caption a video: subtitles (SRT, WebVTT) from its scenes, optionally burnt into an MP4.

Usage:
    python caption_video.py clip.mp4 --model models/RUN --srt out.srt
    python caption_video.py clip.mp4 --model models/RUN --beam 3 --vtt out.vtt --burn out.mp4
    python caption_video.py clip.mov --model models/RUN --every 5 --srt out.srt

Scenes are found by an HSV-histogram test (--threshold), or segments are cut every --every
seconds; the frame in the middle of each scene goes through the same feature extractor and
decoder as photos (generate_caption.py); neighbouring segments with the same caption merge and
a caption stays at least --min-duration seconds. Timestamps are the stream's own (variable
frame rate included); phone rotation is honoured. The details are in captioning/apps/video.py.

Reads:
    clip              any video file FFmpeg decodes (PyAV's wheels carry FFmpeg).
    --model DIR       train.py's run folder (model.keras + model.json).
    --data-dir DIR    prepare_text.py's tokenizer.json + meta.json the model was trained with.
    --weights         the VGG16 fc2 extractor's weights: imagenet | none | PATH (vgg16_build.py).
Writes (each atomically: a temporary file renamed when complete, so an error or Ctrl-C leaves
no half-written file; nothing is written unless captioning succeeded):
    --srt FILE, --vtt FILE   subtitles; --burn FILE  H.264 MP4 with the captions drawn on the
    frames and the original audio (copied, or re-encoded to AAC if MP4 cannot hold it).
    <first output's stem>.settings.json   the settings, counts and timings of the run.
At least one of --srt, --vtt, --burn is needed. Prints one `summary:` line.
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

from captioning.utils import check_installed

check_installed("caption_video.py", "video", "av")   # PyAV decodes and encodes the video
from captioning.apps import video  # noqa: E402
from captioning.encoders.extract import sigterm_as_interrupt
from captioning.inference.captioner import DATA_DIR, PRETRAINED_DIR, WEIGHTS, Captioner
from captioning.inference.decoding import ALPHA, BEAM
from captioning.utils import HelpFormatter, run_cli, save_settings


def photo_captioner(model_dir, data_dir, beam, alpha, weights):
    """caption_images(list of PIL RGB images) -> captions, through the photo path.

    The one place that ties videos to the photo captioner: the same Captioner (model, vocabulary,
    decoder) and image encoder as generate_caption.py, so a frame gets exactly the caption the
    same picture saved as a photo gets.
    """
    captioner = Captioner(model_dir, data_dir)
    captioner.encode = captioner.default_encoder(weights)   # the model's own backbone
    return lambda images: captioner.caption_images(images, beam, alpha)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("clip", help="video file")
    parser.add_argument("--model", default=PRETRAINED_DIR, help="train.py run folder")
    parser.add_argument("--data-dir", default=DATA_DIR,
                        help="prepare_text.py output folder")
    parser.add_argument("--beam", type=int, default=BEAM, help="beam width (1 = greedy)")
    parser.add_argument("--alpha", type=float, default=ALPHA,
                        help="beam length normalisation exponent")
    parser.add_argument("--weights", default=WEIGHTS,
                        help="VGG16 weights: imagenet | none | PATH")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--scenes", action="store_true", default=argparse.SUPPRESS,
                      help="one caption per detected scene: the default mode")
    mode.add_argument("--every", type=float, default=None, metavar="SECONDS",
                      help="one caption per fixed interval instead of per scene")
    parser.add_argument("--threshold", type=float, default=video.SCENE_THRESHOLD,
                        help="scene cut: HSV histogram distance between consecutive frames (0..1)")
    parser.add_argument("--per-scene", type=int, default=video.PER_SCENE,
                        help="frames captioned per scene (the most frequent caption wins)")
    parser.add_argument("--min-duration", type=float, default=video.MIN_DURATION,
                        help="seconds a caption stays on screen at least")
    parser.add_argument("--srt", type=Path, default=None, help="SubRip subtitles to write")
    parser.add_argument("--vtt", type=Path, default=None, help="WebVTT subtitles to write")
    parser.add_argument("--burn", type=Path, default=None, help="MP4 with the captions drawn on")
    args = parser.parse_args(argv)
    if not (args.srt or args.vtt or args.burn):
        parser.error("give at least one output: --srt FILE, --vtt FILE or --burn FILE")
    if args.beam < 1:
        parser.error("--beam must be >= 1")
    if args.every is not None and args.every <= 0:
        parser.error("--every must be > 0 seconds")
    if not 1 <= args.per_scene <= video.CANDIDATES:
        parser.error(f"--per-scene must be 1..{video.CANDIDATES}")
    if args.min_duration < 0:
        parser.error("--min-duration must be >= 0")
    outputs = [p.resolve() for p in (args.srt, args.vtt, args.burn) if p]
    if Path(args.clip).resolve() in outputs or len(set(outputs)) < len(outputs):
        parser.error("the outputs must be different files, and not the input clip")
    return args


def run(args, caption_images, written=None):
    """Caption args.clip and write the outputs; returns (segments, stats). Testable without TF.

    The MP4 (slow) is written first, then the subtitles; each finished output's path is
    appended to `written`, so an interruption can say exactly what exists.
    """
    written = [] if written is None else written
    interactive = sys.stderr.isatty()
    start = time.perf_counter()
    segments, stats = video.caption_video(args.clip, caption_images, every=args.every,
                                          threshold=args.threshold, per_scene=args.per_scene,
                                          min_duration=args.min_duration, progress=interactive)
    stats["caption_seconds"] = round(time.perf_counter() - start, 3)
    if args.burn:
        start = time.perf_counter()
        video.burn(args.clip, args.burn, segments, progress=interactive)
        stats["burn_seconds"] = round(time.perf_counter() - start, 3)
        written.append(args.burn)
    if args.srt:
        video.write_text(args.srt, video.format_srt(segments))
        written.append(args.srt)
    if args.vtt:
        video.write_text(args.vtt, video.format_vtt(segments))
        written.append(args.vtt)
    first = next(p for p in (args.srt, args.vtt, args.burn) if p)
    save_settings(first.with_name(first.stem + ".settings.json"), args, segments=len(segments),
                  **stats)
    return segments, stats


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    written = []
    previous = sigterm_as_interrupt()    # kill = Ctrl-C: temporary files go
    try:
        video.open_video(args.clip).close()        # a bad clip fails before the model loads
        caption_images = photo_captioner(args.model, args.data_dir, args.beam, args.alpha,
                                         args.weights)
        segments, stats = run(args, caption_images, written)
    except KeyboardInterrupt:
        done = ", ".join(map(str, written)) or "nothing"
        print(f"interrupted: no half-written file; complete outputs: {done}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    speed = stats["duration"] / stats["caption_seconds"] if stats["caption_seconds"] else 0.0
    print(f"summary: {stats['frames']} frames, {stats['duration']:.1f} s of video, "
          f"{stats['scenes']} scenes -> {len(segments)} captions in {stats['caption_seconds']:.1f} s "
          f"({speed:.1f}x real time); wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
