"""Caption a video: frames with real timestamps, scenes, one caption per scene, subtitles, burn-in.

Owns everything between a video file and timed captions; it does not know how an image is
captioned. Callers pass `caption_images(list of PIL RGB images) -> list of str` (caption_video.py
wires in the photo captioner; the tests pass a fake), so no TensorFlow is imported here.

Reads: a video file in any container/codec FFmpeg decodes, through PyAV (its wheels carry
    FFmpeg; no system ffmpeg, nothing downloaded).
Writes: SRT and WebVTT text (write_subtitles) and an H.264 MP4 with the captions drawn on the
    frames (burn), each atomically: a temporary file beside the target, renamed when complete.

Time. A frame's time is its presentation timestamp in seconds from the container's start (what a
player shows as 0:00), so variable frame rate is exact: nothing assumes frame index / fps. A frame
lasts until the next frame; the last one for its own duration (or 1 / the stream's rate).

Pictures. Frames are turned upright as a player shows them: the display-matrix rotation that
phones write (frame.rotation, degrees counter-clockwise) is applied; mirroring is not. Any size is
accepted, odd ones included; burn() crops an odd width or height by one pixel, because H.264 in
4:2:0 needs even sizes.

Scenes (the default). Every decoded frame is shrunk to THUMB_SIZE² and reduced to an HSV histogram
(HIST_BINS soft bins per channel, each channel normalised to sum 1). Two consecutive frames whose
histogram distance (half the L1 difference, averaged over H, S and V: 0 = same colours,
1 = disjoint) exceeds SCENE_THRESHOLD start a new scene. Why 0.2: nearly all pairs of different
Flickr8k images score above it, while the same picture panned by a few pixels, zoomed or brightened
a little scores below 0.1 (a sudden strong brightening can cut; its caption then usually merges
with its neighbour's). Histograms ignore motion, so pans do not cut; gradual fades and
dissolves are not detected as cuts.
`every=SECONDS` instead starts a segment at every multiple of SECONDS.

Representative frames. Each scene's caption comes from `per_scene` frames spread evenly over its
time (per_scene 1 = the frame nearest the scene's middle); with several, the most frequent caption
wins, ties going to the frame nearest the middle. At most CANDIDATES frames per scene are held
while it plays (every 2^k-th frame), so memory does not grow with the scene's length.

Segments. Neighbours with the same caption merge; then a segment shorter than min_duration is
merged into its longer neighbour (taking that caption), repeatedly, so nothing flickers. A clip
shorter than min_duration keeps its one short segment: a caption never outlasts the video.
"""
import math
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from captioning.utils import PipelineError, atomic_write

# ---- settings -----------------------------------------------------------------------------------
SCENE_THRESHOLD = 0.20   # HSV histogram distance in [0, 1] above which consecutive frames are a cut
HIST_BINS = 16           # bins per HSV channel
THUMB_SIZE = 64          # frames are shrunk to THUMB_SIZE x THUMB_SIZE before the histogram
MIN_DURATION = 1.0       # seconds a caption stays on screen at least (shorter segments merge)
PER_SCENE = 1            # frames captioned per scene
CANDIDATES = 16          # frames per scene held as candidates while the scene plays
CAPTION_BATCH = 16       # frames per caption_images call (memory: full-size frames)
BURN_CRF = 20            # x264 quality for --burn (lower = better, bigger; 18-23 is usual)
BURN_PRESET = "veryfast"  # x264 speed/size trade-off for --burn
FONT_HEIGHT = 0.055      # caption text height as a fraction of the frame height
MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}  # copied; others become AAC


# ---- decoding -----------------------------------------------------------------------------------
def _reason(exc):
    """The useful part of a PyAV/FFmpeg error: its strerror, without the repeated file name."""
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0] or type(exc).__name__


def open_video(path):
    """Open `path` for decoding -> av container; one-line PipelineError if it is not a video."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"video not found ({path})")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise PipelineError(f"not a readable video ({path}: {_reason(exc)})") from None
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams}) or ["no streams"]
        container.close()
        raise PipelineError(f"no video stream in {path} (it has: {', '.join(kinds)})")
    return container


def upright(image, rotation):
    """A decoded picture as a player shows it: rotated counter-clockwise by `rotation` degrees."""
    turns = round((rotation or 0) / 90) % 4
    transpose = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180,
                 3: Image.Transpose.ROTATE_270}
    return image.transpose(transpose[turns]) if turns else image


@dataclass
class Frame:
    """One decoded frame: `time` and `duration` in seconds (see the module docstring)."""
    time: float
    duration: float
    av_frame: object = field(repr=False)

    def image(self):
        """The full-size picture, upright, as a PIL RGB image."""
        return upright(self.av_frame.to_image(), self.av_frame.rotation)

    def thumbnail(self):
        """THUMB_SIZE² RGB uint8 array (swscale shrinks it: far cheaper than a full conversion)."""
        small = self.av_frame.reformat(width=THUMB_SIZE, height=THUMB_SIZE, format="rgb24")
        return small.to_ndarray()


def stream_info(container):
    """(frames or None, rate or None, start seconds) of the first video stream, from its header."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    start = container.start_time / 1e6 if container.start_time is not None else None
    return (stream.frames or None), (float(rate) if rate else None), start


def decode_frames(container, path="video"):
    """Yield the first video stream's frames in presentation order as Frame objects.

    Timestamps are the frames' own; a frame without one follows its predecessor by the stream's
    frame period. Times never go backwards (a broken timestamp is held at the previous one).
    """
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"    # frame + slice threads: decoding may use every core
    _, rate, zero = stream_info(container)
    period = 1.0 / rate if rate else 0.0
    previous = None
    try:
        for av_frame in container.decode(stream):
            if av_frame.time is not None:
                if zero is None:
                    zero = av_frame.time
                time = av_frame.time - zero
            else:
                time = 0.0 if previous is None else previous.time + (previous.duration or period)
            if previous is not None:
                time = max(time, previous.time)
                previous.duration = time - previous.time
                yield previous
            own = (av_frame.duration or 0) * float(av_frame.time_base or 0)
            previous = Frame(max(time, 0.0), own or period, av_frame)
    except av.error.FFmpegError as exc:
        where = f"after {previous.time:.2f} s" if previous is not None else "at the start"
        raise PipelineError(f"corrupt video data {where} ({path}: {_reason(exc)})") from None
    if previous is not None:
        yield previous


# ---- scenes -------------------------------------------------------------------------------------
def _soft_bins(bins=HIST_BINS):
    """(256, bins) matrix: row v shares value v between the two nearest bin centres."""
    position = np.clip(np.arange(256) * bins / 256 - 0.5, 0, bins - 1)   # 0 = first bin centre
    low = np.minimum(position.astype(np.int64), bins - 2)
    weights = np.zeros((256, bins))
    weights[np.arange(256), low] += 1 - (position - low)
    weights[np.arange(256), low + 1] += position - low
    return weights


SOFT_BINS = _soft_bins()


def hsv_histogram(rgb):
    """(3, HIST_BINS) HSV histogram of an RGB uint8 array, each channel summing to 1.

    Soft bins: a value shares its count between the two nearest bin centres in proportion to
    its distance from them, so a small brightness change moves a little mass, never a whole
    flat-coloured picture across a bin edge. (Counting the 256 values, then one matrix
    product, is 25x faster than binning every pixel.)
    """
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).reshape(-1, 3)
    counts = np.bincount((hsv + np.arange(3) * 256).ravel(), minlength=3 * 256).reshape(3, 256)
    histogram = counts @ SOFT_BINS
    return histogram / histogram.sum(axis=1, keepdims=True)


def histogram_distance(a, b):
    """Half the L1 difference of two hsv_histograms, averaged over channels: 0..1."""
    return float(0.5 * np.abs(a - b).sum(axis=1).mean())


@dataclass
class Scene:
    """A stretch of frames between two cuts: [start, end) seconds and the frames to caption."""
    start: float
    end: float
    picks: list          # PIL RGB images, spread over the scene (see the module docstring)
    pick_times: list     # their times, seconds


@dataclass
class Segment:
    """A caption on screen from `start` to `end` seconds."""
    start: float
    end: float
    caption: str


class SceneSplitter:
    """Turns frames into Scenes as they stream by, holding at most CANDIDATES frames.

    add(frame) returns the scene that the frame ended (it starts a new one) or None;
    finish() returns the last scene. every=None cuts on histograms, else every `every` seconds.
    """

    def __init__(self, every=None, threshold=SCENE_THRESHOLD, per_scene=PER_SCENE,
                 candidates=CANDIDATES):
        if every is not None and every <= 0:
            raise PipelineError(f"--every must be > 0 seconds (got {every})")
        if per_scene < 1 or candidates < per_scene:
            raise PipelineError(f"frames per scene must be 1..{candidates} (got {per_scene})")
        self.every, self.threshold = every, threshold
        self.per_scene, self.cap = per_scene, candidates
        self.scene_start = None
        self.key = None              # last histogram, or the current interval number
        self.count = 0               # frames seen in the current scene
        self.stride = 1              # every stride-th frame of the scene is a candidate
        self.candidates = []
        self.last = None             # the latest frame: its end is the clip's end
        self.frames = 0              # frames seen in all

    def is_cut(self, frame):
        if self.every is not None:
            key = math.floor(frame.time / self.every + 1e-9)
            cut = self.key is not None and key != self.key
        else:
            key = hsv_histogram(frame.thumbnail())
            cut = self.key is not None and histogram_distance(self.key, key) > self.threshold
        self.key = key
        return cut

    def add(self, frame):
        finished = None
        if self.is_cut(frame):
            finished = self._close(frame.time)
        if self.scene_start is None:
            self.scene_start, self.count, self.stride, self.candidates = frame.time, 0, 1, []
        if self.count % self.stride == 0:
            self.candidates.append(frame)
            if len(self.candidates) > self.cap:     # thin out: keep every other, double the stride
                self.candidates = self.candidates[::2]
                self.stride *= 2
        self.count += 1
        self.frames += 1
        self.last = frame
        return finished

    def finish(self):
        if self.last is None:
            return None
        return self._close(self.last.time + self.last.duration)

    def _close(self, end):
        start, frames = self.scene_start, self.candidates
        chosen = []
        for i in range(self.per_scene):
            target = start + (i + 0.5) / self.per_scene * (end - start)
            best = min(range(len(frames)), key=lambda j: abs(frames[j].time - target))
            if best not in chosen:
                chosen.append(best)
        self.scene_start, self.candidates = None, []
        picks = [frames[j] for j in sorted(chosen)]
        return Scene(start, end, [f.image() for f in picks], [f.time for f in picks])


def vote(captions):
    """The most frequent caption; a tie goes to the one nearest the middle of the list."""
    counts, middle = Counter(captions), (len(captions) - 1) / 2
    return max(counts, key=lambda c: (counts[c], -min(abs(i - middle)
                                                      for i, x in enumerate(captions) if x == c)))


def caption_scenes(scenes, caption_images, batch=CAPTION_BATCH):
    """Scenes (any iterable, consumed lazily) -> one Segment per scene, in order.

    Frames go to caption_images in batches of about `batch`, so a long video's frames are not
    all held at once.
    """
    segments, pending = [], []

    def flush():
        images = [image for scene in pending for image in scene.picks]
        captions = list(caption_images(images)) if images else []
        if len(captions) != len(images):
            raise PipelineError(f"the captioner returned {len(captions)} captions for "
                                f"{len(images)} frames")
        at = 0
        for scene in pending:
            own = captions[at:at + len(scene.picks)]
            at += len(scene.picks)
            segments.append(Segment(scene.start, scene.end, vote(own)))
        pending.clear()

    for scene in scenes:
        pending.append(scene)
        if sum(len(s.picks) for s in pending) >= batch:
            flush()
    if pending:
        flush()
    return segments


def scenes_of(frames, splitter):
    """Frames -> Scenes through a SceneSplitter (a generator: decoding runs as scenes are used)."""
    for frame in frames:
        scene = splitter.add(frame)
        if scene is not None:
            yield scene
    last = splitter.finish()
    if last is not None:
        yield last


# ---- segments -----------------------------------------------------------------------------------
def merge_same(segments):
    """Neighbouring segments with the same caption become one."""
    out = []
    for seg in segments:
        if out and out[-1].caption == seg.caption:
            out[-1] = Segment(out[-1].start, seg.end, seg.caption)
        else:
            out.append(Segment(seg.start, seg.end, seg.caption))
    return out


def merge_segments(segments, min_duration=MIN_DURATION):
    """merge_same, then fold every segment shorter than min_duration into its longer neighbour.

    The shortest segment is folded first (ties: the earliest), into the longer of its two
    neighbours (ties: the earlier one); captions that become neighbours are merged again.
    """
    segs = merge_same(segments)
    while len(segs) > 1:
        short = [i for i, s in enumerate(segs) if s.end - s.start < min_duration]
        if not short:
            break
        i = min(short, key=lambda k: (segs[k].end - segs[k].start, k))
        neighbours = [k for k in (i - 1, i + 1) if 0 <= k < len(segs)]
        host = max(neighbours, key=lambda k: (segs[k].end - segs[k].start, -k))
        lo, hi = min(i, host), max(i, host)
        segs[lo:hi + 1] = [Segment(segs[lo].start, segs[hi].end, segs[host].caption)]
        segs = merge_same(segs)
    return segs


def caption_video(path, caption_images, every=None, threshold=SCENE_THRESHOLD,
                  per_scene=PER_SCENE, min_duration=MIN_DURATION, batch=CAPTION_BATCH,
                  progress=False):
    """Caption the video at `path` -> (merged Segments, stats dict).

    stats: frames, scenes (before merging), duration (seconds of video), rate (fps or None).
    """
    container = open_video(path)
    try:
        total, rate, _ = stream_info(container)
        splitter = SceneSplitter(every, threshold, per_scene)
        frames = tqdm(decode_frames(container, path), total=total, unit="frame", desc="video",
                      disable=not progress, mininterval=0.5)
        raw = caption_scenes(scenes_of(frames, splitter), caption_images, batch)
        frames.close()
    finally:
        container.close()
    if not raw:
        raise PipelineError(f"no frames could be decoded from {path}")
    stats = {"frames": splitter.frames, "scenes": len(raw), "duration": raw[-1].end, "rate": rate}
    return merge_segments(raw, min_duration), stats


# ---- subtitles ----------------------------------------------------------------------------------
def _clock(seconds, separator):
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def _cues(segments):
    """(start, end, one-line text) per segment with a caption; empty captions show nothing."""
    for seg in segments:
        text = " ".join(seg.caption.split())
        if text:
            end = max(seg.end, seg.start + 0.001)    # a cue must end after it starts
            yield seg.start, end, text


def format_srt(segments):
    """SubRip text: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    blocks = [f"{n}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{text}\n"
              for n, (start, end, text) in enumerate(_cues(segments), start=1)]
    return "\n".join(blocks)


def format_vtt(segments):
    """WebVTT text: the WEBVTT header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues, text escaped."""
    def escape(text):   # WebVTT cue text is HTML-like: & and < start markup
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    blocks = [f"{_clock(start, '.')} --> {_clock(end, '.')}\n{escape(text)}\n"
              for start, end, text in _cues(segments)]
    return "\n".join(["WEBVTT\n"] + blocks)


def write_text(path, text):
    """Write a subtitle file atomically (UTF-8, \\n line ends)."""
    with atomic_write(path) as handle:
        handle.write(text)


# ---- burning captions into the picture ---------------------------------------------------------
def _font(height):
    return ImageFont.load_default(size=max(10, round(height * FONT_HEIGHT)))


def _layout(caption, width, height, font):
    """Lines of `caption` wrapped to 90% of the width, centred, bottom-aligned: [(xy, line)]."""
    words = " ".join(caption.split())
    if not words:
        return []
    average = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    lines = textwrap.wrap(words, max(8, int(0.9 * width / average)))
    line_height = round(font.size * 1.25)
    y = height - round(0.05 * height) - line_height * len(lines)
    placed = []
    for line in lines:
        placed.append(((max(0, (width - font.getlength(line)) / 2), y), line))
        y += line_height
    return placed


def _overlay(caption, size, font):
    """(RGBA picture of the caption's lines, white with a black outline, and its top-left
    corner) for a frame of `size`, or None for an empty caption."""
    placed = _layout(caption, *size, font)
    if not placed:
        return None
    canvas = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for xy, line in placed:
        draw.text(xy, line, font=font, fill=(255, 255, 255, 255),
                  stroke_width=max(1, font.size // 12), stroke_fill=(0, 0, 0, 255))
    box = canvas.getbbox()
    return canvas.crop(box), box[:2]


def draw_caption(image, caption, font, cache):
    """Draw `caption` at the bottom of a PIL RGB image, in place.

    Each caption is rendered once into a transparent overlay (kept in `cache`) and pasted on
    every frame: FreeType rendering with an outline costs ~8 ms a 640x360 frame, pasting ~0.3.
    """
    key = (caption, image.size)
    if key not in cache:
        cache[key] = _overlay(caption, image.size, font)
    if cache[key] is not None:
        overlay, corner = cache[key]
        image.paste(overlay, corner, overlay)


def _first_frame(path):
    """The first decoded frame's upright (width, height), to size the encoder before muxing."""
    container = open_video(path)
    try:
        for frame in decode_frames(container, path):
            return frame.image().size
    finally:
        container.close()
    raise PipelineError(f"no frames could be decoded from {path}")


def burn(path, out_path, segments, crf=BURN_CRF, preset=BURN_PRESET, progress=False):
    """Write `out_path`: an H.264 MP4 of `path` with each segment's caption drawn on its frames.

    Frames keep their own timestamps (variable frame rate stays variable). The first audio
    stream is copied when MP4 can hold its codec (MP4_AUDIO), else re-encoded to AAC; other
    streams are dropped. Written to a temporary file and renamed, so a failure or Ctrl-C leaves
    no half-written MP4. Returns the number of frames written.
    """
    width, height = _first_frame(path)
    width, height = width - width % 2, height - height % 2      # 4:2:0 needs even sizes
    if width < 2 or height < 2:
        raise PipelineError(f"video too small to burn captions into ({path})")
    container = open_video(path)
    try:
        v_in = container.streams.video[0]
        a_in = container.streams.audio[0] if container.streams.audio else None
        total = stream_info(container)[0]
        with atomic_write(out_path, "w+b") as handle:   # w+: faststart reads the file back
            out = av.open(handle, "w", format="mp4", options={"movflags": "+faststart"})
            try:
                nominal = v_in.average_rate or v_in.guessed_rate or 25   # timestamps rule
                v_out = out.add_stream("libx264", rate=nominal,
                                       options={"crf": str(crf), "preset": preset})
                v_out.width, v_out.height, v_out.pix_fmt = width, height, "yuv420p"
                v_out.codec_context.time_base = v_in.time_base
                a_out, a_copy = None, False
                if a_in is not None:
                    a_copy = a_in.codec_context.name in MP4_AUDIO
                    a_out = (out.add_stream_from_template(a_in) if a_copy
                             else out.add_stream("aac", rate=a_in.codec_context.sample_rate,
                                                 layout=_aac_layout(a_in.codec_context)))
                bar = tqdm(total=total, unit="frame", desc="burn", disable=not progress,
                           mininterval=0.5)
                written = _burn_frames(container, v_in, a_in, out, v_out, a_out, a_copy,
                                       segments, (width, height), bar, path)
                bar.close()
            finally:
                out.close()
    finally:
        container.close()
    return written


def _aac_layout(codec_context):
    """The input's channel layout, or FFmpeg's default one for its channel count when the input
    only says "N channels" (raw PCM does), which the AAC encoder refuses; stereo past 8."""
    name = codec_context.layout.name
    if "channels" not in name:
        return name
    return {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1",
            8: "7.1"}.get(codec_context.channels, "stereo")


def _burn_frames(container, v_in, a_in, out, v_out, a_out, a_copy, segments, size, bar, path):
    """The demux loop of burn(): video frames decoded, captioned, encoded; audio copied/encoded."""
    font, cache = _font(size[1]), {}
    streams = [v_in] + ([a_in] if a_in is not None else [])
    zero = stream_info(container)[2]          # as decode_frames: the container's start, else
    at, written, last_pts = 0, 0, None        # the first frame's time
    try:
        for packet in container.demux(*streams):
            if packet.stream is a_in:
                if a_copy:
                    if packet.dts is not None:       # skip the demuxer's empty flush packet
                        packet.stream = a_out
                        out.mux(packet)
                else:
                    for audio in packet.decode():
                        out.mux(a_out.encode(audio))
                continue
            for frame in packet.decode():
                if zero is None:
                    zero = frame.time or 0.0
                time = (frame.time if frame.time is not None else zero) - zero
                while at + 1 < len(segments) and time >= segments[at + 1].start:
                    at += 1
                image = upright(frame.to_image(), frame.rotation)
                if image.size != size:    # odd sizes lose their last column/row; a size
                    trim = (image.width - size[0], image.height - size[1])  # change is scaled
                    image = image.crop((0, 0, *size)) if set(trim) <= {0, 1} else image.resize(size)
                if segments and segments[at].start - 1e-6 <= time < segments[at].end:
                    draw_caption(image, segments[at].caption, font, cache)
                new = av.VideoFrame.from_image(image)
                pts = frame.pts if frame.pts is not None else (last_pts or -1) + 1
                if last_pts is not None and pts <= last_pts:   # H.264 needs rising timestamps
                    pts = last_pts + 1
                new.pts, new.time_base, last_pts = pts, v_in.time_base, pts
                out.mux(v_out.encode(new))
                written += 1
                bar.update(1)
        out.mux(v_out.encode(None))
        if a_out is not None and not a_copy:
            out.mux(a_out.encode(None))
    except av.error.FFmpegError as exc:
        raise PipelineError(f"cannot re-encode {path}: {_reason(exc)}") from None
    return written
