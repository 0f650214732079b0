"""Tests for captioning/apps/video.py and caption_video.py on clips built here with PyAV from the
shared Flickr8k images: scenes and their timestamps, VFR, rotation, odd sizes, a 1-frame clip,
audio kept by --burn, SRT/WebVTT parsed back, bad input, Ctrl-C, and one run through the real
captioner stack (a tiny model) against the photo path's captions of the same images."""
import math
import re
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

import caption_video as cv
from captioning.apps import video
from captioning.utils import run_cli

IMAGE_NAMES = ["1000268201_693b08cb0e", "1001773457_577c3a7d70", "1002674143_1b742ab4b8"]
MS = Fraction(1, 1000)


# ---- building clips -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(flickr8k_dir):
    """The three test images (224x224 RGB), as {name: PIL image}."""
    folder = flickr8k_dir / "Flicker8k_Dataset"
    return {name: Image.open(folder / f"{name}.jpg").convert("RGB") for name in IMAGE_NAMES}


def write_clip(path, frames, rate=25, rotation=None, audio_seconds=None, audio_codec="aac",
               codec="libx264", pix_fmt="yuv420p", fmt=None, movflags=None):
    """Encode `frames` [(seconds, PIL image), ...] with exactly those timestamps (1 ms units).

    `rate` is only the stream's nominal rate. audio_seconds adds a 440 Hz mono tone.
    """
    options = {"movflags": movflags} if movflags else {}
    container = av.open(str(path), "w", format=fmt, options=options)
    width, height = frames[0][1].size
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    stream.codec_context.time_base = MS
    if rotation is not None:
        stream.set_display_rotation(rotation)
    audio = None
    if audio_seconds:
        audio = container.add_stream(audio_codec, rate=16000, layout="mono")
    for seconds, image in frames:
        frame = av.VideoFrame.from_image(image)
        frame.pts, frame.time_base = round(seconds * 1000), MS
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
    if audio is not None:
        samples = int(16000 * audio_seconds)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 16000)).astype(np.float32)
        fmt_name = "fltp" if audio_codec == "aac" else "s16"
        for start in range(0, samples, 1024):
            chunk = tone[None, start:start + 1024]
            if fmt_name == "s16":
                chunk = (chunk * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(chunk, format=fmt_name, layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, start, Fraction(1, 16000)
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
    container.close()
    return path


def three_image_frames(images, seconds=2.0, fps=25):
    """The three images, `seconds` each, at a constant `fps`."""
    per = round(seconds * fps)
    pictures = list(images.values())
    return [(i / fps, pictures[i // per]) for i in range(3 * per)]


@pytest.fixture(scope="module")
def three_clip(images, tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clips") / "three.mp4", three_image_frames(images))


class FakeCaptioner:
    """Captions a frame with the name of the reference picture it looks like (mean abs pixel
    difference at 32x32 below 12 of 255), else "unknown"; records what it was shown."""

    def __init__(self, references):
        self.references = {name: self.small(image) for name, image in references.items()}
        self.seen = []

    @staticmethod
    def small(image):
        return np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)

    def __call__(self, frames):
        out = []
        for frame in frames:
            assert frame.mode == "RGB"
            self.seen.append(frame.size)
            errors = {name: np.abs(self.small(frame) - ref).mean()
                      for name, ref in self.references.items()}
            name = min(errors, key=errors.get)
            out.append(f"a picture of {name}" if errors[name] < 12 else "unknown")
        return out


def args_for(clip, out_dir, *extra):
    return cv.parse_args([str(clip), "--srt", str(out_dir / "out.srt"),
                          "--vtt", str(out_dir / "out.vtt"), *extra])


# ---- the three-image clip -----------------------------------------------------------------------
def test_three_images_give_three_segments(three_clip, images, tmp_path):
    fake = FakeCaptioner(images)
    segments, stats = cv.run(args_for(three_clip, tmp_path), fake)
    assert [s.caption for s in segments] == [f"a picture of {n}" for n in IMAGE_NAMES]
    assert abs(segments[1].start - 2.0) <= 0.25 and abs(segments[2].start - 4.0) <= 0.25
    assert segments[0].start == 0.0 and segments[0].end == segments[1].start
    assert math.isclose(segments[2].end, 6.0, abs_tol=0.05)
    assert stats["frames"] == 150 and stats["scenes"] == 3
    assert fake.seen == [(224, 224)] * 3                      # one frame per scene, full size
    import srt
    cues = list(srt.parse((tmp_path / "out.srt").read_text()))
    assert [c.content for c in cues] == [s.caption for s in segments]
    assert [round(c.start.total_seconds(), 3) for c in cues] == [0.0, 2.0, 4.0]
    assert (tmp_path / "out.settings.json").is_file()


def test_fixed_interval_segments_merge_to_the_scenes(three_clip, images):
    fake = FakeCaptioner(images)
    segments, stats = video.caption_video(three_clip, fake, every=0.5)
    assert stats["scenes"] == 12 and len(fake.seen) == 12      # 12 intervals captioned
    assert [s.caption for s in segments] == [f"a picture of {n}" for n in IMAGE_NAMES]
    assert [s.start for s in segments] == [0.0, 2.0, 4.0]     # interval starts are frame times


def test_several_frames_per_scene_vote(three_clip, images):
    fake = FakeCaptioner(images)
    segments, _ = video.caption_video(three_clip, fake, per_scene=3)
    assert len(fake.seen) == 9 and len(segments) == 3


# ---- timestamps, rotation, sizes ----------------------------------------------------------------
def test_variable_frame_rate_uses_real_timestamps(images, tmp_path):
    # irregular frame times; counting frames at the nominal 25 fps would put the cuts at
    # 0.28 s (7 frames) and 1.08 s (27 frames) instead of 2 s and 4 s
    first, second, third = images.values()
    times_a = [0, 0.04, 0.3, 0.31, 0.9, 1.5, 1.96]
    times_b = [2.0 + 0.1 * k for k in range(20)]
    times_c = [4.0, 4.5, 5.9]
    frames = ([(t, first) for t in times_a] + [(t, second) for t in times_b]
              + [(t, third) for t in times_c])
    clip = write_clip(tmp_path / "vfr.mp4", frames, rate=25)
    segments, stats = cv.run(args_for(clip, tmp_path, "--burn", str(tmp_path / "b.mp4")),
                             FakeCaptioner(images))
    assert stats["frames"] == 30
    assert [round(s.start, 3) for s in segments] == [0.0, 2.0, 4.0]
    assert [s.caption for s in segments] == [f"a picture of {n}" for n in IMAGE_NAMES]
    with av.open(str(tmp_path / "b.mp4")) as out:                # --burn keeps the timing
        assert [round(f.time, 3) for f in out.decode(video=0)] == [round(t, 3) for t, _ in frames]


def test_representative_frame_is_the_middle_one_by_time(images, tmp_path):
    # one scene of VFR frames: the middle by time (0.95 s of 0..1.9 s) is nearest the frame
    # at 1.0 s, the 11th of 12 (counting frames would pick the 6th or 7th)
    times = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 1.0, 1.9]
    clip = write_clip(tmp_path / "one_scene.mp4", [(t, images[IMAGE_NAMES[0]]) for t in times])
    container = video.open_video(clip)
    scenes = list(video.scenes_of(video.decode_frames(container), video.SceneSplitter()))
    container.close()
    assert len(scenes) == 1 and scenes[0].pick_times == [1.0]


def test_one_frame_clip(images, tmp_path):
    picture = images[IMAGE_NAMES[0]]
    clip = write_clip(tmp_path / "one.mp4", [(0.0, picture)], rate=25)
    fake = FakeCaptioner(images)
    segments, stats = cv.run(args_for(clip, tmp_path, "--burn", str(tmp_path / "b.mp4")), fake)
    assert stats["frames"] == 1 and len(segments) == 1
    assert segments[0].caption == f"a picture of {IMAGE_NAMES[0]}"
    assert segments[0].start == 0.0 and 0 < segments[0].end <= 0.1      # one 1/25 s frame
    assert len(parse_srt((tmp_path / "out.srt").read_text())) == 1
    with av.open(str(tmp_path / "b.mp4")) as out:
        assert sum(1 for _ in out.decode(video=0)) == 1


def test_odd_size(images, tmp_path):
    picture = images[IMAGE_NAMES[1]].resize((321, 241))
    # x264 in 4:2:0 needs even sizes, so the test clip is 4:4:4 (phones' clips can be odd too)
    clip = write_clip(tmp_path / "odd.mp4", [(i / 25, picture) for i in range(10)],
                      pix_fmt="yuv444p")
    fake = FakeCaptioner({IMAGE_NAMES[1]: picture})
    segments, _ = cv.run(args_for(clip, tmp_path, "--burn", str(tmp_path / "b.mp4")), fake)
    assert fake.seen == [(321, 241)]
    assert segments[0].caption == f"a picture of {IMAGE_NAMES[1]}"
    with av.open(str(tmp_path / "b.mp4")) as out:
        first = next(out.decode(video=0))
        assert (first.width, first.height) == (320, 240)


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_rotated_phone_video_is_turned_upright(images, tmp_path, rotation):
    # a portrait picture stored sideways with a display matrix, as phones record it; the
    # stored picture is the upright one turned the other way, so only honouring the
    # rotation gives the upright picture back
    upright = images[IMAGE_NAMES[2]].crop((32, 0, 192, 224))          # 160 x 224, portrait
    undo = {-90: Image.Transpose.ROTATE_90, 90: Image.Transpose.ROTATE_270,
            180: Image.Transpose.ROTATE_180}[rotation]
    stored = upright.transpose(undo)
    clip = write_clip(tmp_path / "phone.mp4", [(i / 25, stored) for i in range(10)],
                      rotation=rotation)
    fake = FakeCaptioner({"upright": upright, "stored": stored.resize(upright.size)})
    segments, _ = cv.run(args_for(clip, tmp_path, "--burn", str(tmp_path / "b.mp4")), fake)
    assert fake.seen == [(160, 224)]
    assert segments[0].caption == "a picture of upright"
    with av.open(str(tmp_path / "b.mp4")) as out:
        first = next(out.decode(video=0))
        assert (first.width, first.height, first.rotation) == (160, 224, 0)


# ---- --burn -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, audio_codec, copied", [(".mp4", "aac", True),
                                                          (".mkv", "pcm_s16le", False)])
def test_burn_draws_captions_and_keeps_audio(images, tmp_path, suffix, audio_codec, copied):
    frames = three_image_frames(images, seconds=1.0)
    clip = write_clip(tmp_path / f"talk{suffix}", frames, audio_seconds=3.0,
                      audio_codec=audio_codec)
    out_path = tmp_path / "burnt.mp4"
    segments, stats = cv.run(args_for(clip, tmp_path, "--burn", str(out_path),
                                      "--min-duration", "0.5"), FakeCaptioner(images))
    assert len(segments) == 3
    with av.open(str(out_path)) as out:
        assert out.format.name.startswith("mov,mp4")
        v, a = out.streams.video[0], out.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert a.codec_context.sample_rate == 16000 and a.codec_context.channels == 1
        pictures = [(f.time, f.to_image()) for f in out.decode(v)]
        out.seek(0)
        tone = np.concatenate([f.to_ndarray().reshape(-1) for f in out.decode(a)])
    assert len(pictures) == 75
    assert [round(t, 3) for t, _ in pictures[:3]] == [0.0, 0.04, 0.08]
    # each frame carries its own segment's caption: it matches the source picture with that
    # caption drawn on it (up to H.264 noise), not the bare picture nor another caption
    font = video._font(224)

    def drawn(picture, caption):
        picture = picture.copy()
        if caption:
            video.draw_caption(picture, caption, font, {})
        return np.asarray(picture, dtype=np.float32)[180:215]

    for (t, picture), (_, source) in list(zip(pictures, frames))[10::25]:
        own = next(s.caption for s in segments if s.start <= t < s.end)
        other = next(s.caption for s in segments if s.caption != own)
        got = np.asarray(picture, dtype=np.float32)[180:215]
        error = {name: np.abs(got - drawn(source, caption)).mean()
                 for name, caption in [("own", own), ("other", other), ("none", "")]}
        assert error["own"] < 6 and error["own"] * 2 < min(error["other"], error["none"]), error
    # the audio is the tone, all of it: 3 s at 16 kHz (AAC adds up to one frame of padding)
    assert 48000 <= len(tone) <= 48000 + 2048
    spectrum = np.abs(np.fft.rfft(tone[4000:20000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 2          # 1 Hz bins


# ---- subtitles format ---------------------------------------------------------------------------
SRT_CUE = re.compile(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n([^\n]+)\n")
VTT_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})\n([^\n]+)\n")


def _seconds(h, m, s, ms):
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_srt(text):
    """Strict SubRip parse: cues separated by one blank line, numbered 1.., nothing else."""
    blocks = text.split("\n\n")
    cues = []
    for n, block in enumerate(blocks, start=1):
        match = SRT_CUE.fullmatch(block + ("\n" if not block.endswith("\n") else ""))
        assert match, f"bad SRT block {block!r}"
        assert int(match[1]) == n
        cues.append((_seconds(*match.groups()[1:5]), _seconds(*match.groups()[5:9]), match[10]))
    return cues


SEGMENTS = [video.Segment(0.0, 1.5, "a dog runs"), video.Segment(1.5, 3661.5004, "a <b> & c"),
            video.Segment(3661.5004, 3662.0, "   "), video.Segment(3662.0, 3663.25, "two\nlines")]


def test_srt_exact_text_and_libraries_accept_it():
    text = video.format_srt(SEGMENTS)
    assert text == ("1\n00:00:00,000 --> 00:00:01,500\na dog runs\n\n"
                    "2\n00:00:01,500 --> 01:01:01,500\na <b> & c\n\n"
                    "3\n01:01:02,000 --> 01:01:03,250\ntwo lines\n")        # empty caption: no cue
    assert parse_srt(text) == [(0.0, 1.5, "a dog runs"), (1.5, 3661.5, "a <b> & c"),
                               (3662.0, 3663.25, "two lines")]
    import srt
    parsed = list(srt.parse(text))
    assert [c.end.total_seconds() for c in parsed] == [1.5, 3661.5, 3663.25]


def test_vtt_exact_text_and_libraries_accept_it():
    text = video.format_vtt(SEGMENTS)
    assert text == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\na dog runs\n\n"
                    "00:00:01.500 --> 01:01:01.500\na &lt;b&gt; &amp; c\n\n"
                    "01:01:02.000 --> 01:01:03.250\ntwo lines\n")
    header, *blocks = text.split("\n\n")
    assert header == "WEBVTT"
    assert all(VTT_CUE.fullmatch(b if b.endswith("\n") else b + "\n") for b in blocks)
    import io
    import webvtt
    cues = webvtt.from_buffer(io.StringIO(text)).captions
    assert [(c.start, c.end, c.text) for c in cues] == [
        ("00:00:00.000", "00:00:01.500", "a dog runs"),
        ("00:00:01.500", "01:01:01.500", "a &lt;b&gt; &amp; c"),
        ("01:01:02.000", "01:01:03.250", "two lines")]


# ---- segment logic on hand-written lists ---------------------------------------------------------
def segs(*triples):
    return [video.Segment(a, b, c) for a, b, c in triples]


def test_merge_same_caption_neighbours():
    got = video.merge_segments(segs((0, 2, "x"), (2, 3, "x"), (3, 5, "y"), (5, 7, "x")), 1.0)
    assert got == segs((0, 3, "x"), (3, 5, "y"), (5, 7, "x"))


def test_short_segments_fold_into_longer_neighbour():
    # "b" (0.3 s) goes to "c" (4 s), not "a" (2 s); then "a", "c", "d"(0.5) -> "d" joins "c"
    got = video.merge_segments(segs((0, 2, "a"), (2, 2.3, "b"), (2.3, 6.3, "c"), (6.3, 6.8, "d")),
                               1.0)
    assert got == segs((0, 2, "a"), (2, 6.8, "c"))
    # a short one between two equal captions: they become one
    got = video.merge_segments(segs((0, 2, "a"), (2, 2.5, "b"), (2.5, 3.5, "a")), 1.0)
    assert got == segs((0, 3.5, "a"))
    # every segment short: folds until one caption is left on screen
    got = video.merge_segments(segs((0, .2, "a"), (.2, .5, "b"), (.5, .6, "c")), 1.0)
    assert got == segs((0, .6, "b"))
    assert video.merge_segments(segs((0, .04, "a")), 1.0) == segs((0, .04, "a"))


def test_vote_picks_majority_then_middle():
    assert video.vote(["a", "b", "b"]) == "b"
    assert video.vote(["a", "b", "c"]) == "b"
    assert video.vote(["a", "a", "b", "b", "c"]) in ("a", "b")
    assert video.vote(["x", "a", "y", "a", "b", "z", "b"]) == "a"      # a at 1,3; b at 4,6: a nearer


class FakeFrame:
    """Duck-typed video.Frame: a flat colour thumbnail, its time as the 'image'."""

    def __init__(self, time, shade):
        self.time, self.duration, self.shade = time, 0.04, shade

    def thumbnail(self):
        return np.full((8, 8, 3), self.shade, dtype=np.uint8)

    def image(self):
        return self.time


def test_scene_splitter_holds_few_frames_and_finds_cuts():
    frames = [FakeFrame(k * 0.04, 10 if k < 1000 else 200) for k in range(1010)]
    splitter = video.SceneSplitter(per_scene=3)
    held, scenes = 0, []
    for frame in frames:
        scene = splitter.add(frame)
        held = max(held, len(splitter.candidates))
        if scene is not None:
            scenes.append(scene)
    scenes.append(splitter.finish())
    assert held <= video.CANDIDATES
    assert [(round(s.start, 2), round(s.end, 2)) for s in scenes] == [(0.0, 40.0), (40.0, 40.4)]
    # targets 6.67, 20, 33.33 s (1/6, 3/6, 5/6 of 40 s); after thinning, the candidates are
    # every 64th frame (2.56 s apart): the nearest are 7.68, 20.48 and 33.28 s
    assert [round(t, 2) for t in scenes[0].pick_times] == [7.68, 20.48, 33.28]
    assert scenes[0].picks == scenes[0].pick_times


# ---- bad input and interruption -----------------------------------------------------------------
def bad_clips(tmp_path, images):
    good = write_clip(tmp_path / "good.mp4", [(i / 25, images[IMAGE_NAMES[0]]) for i in range(50)])
    fast = write_clip(tmp_path / "fast.mp4", [(i / 25, images[IMAGE_NAMES[0]]) for i in range(50)],
                      movflags="+faststart")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    truncated = tmp_path / "truncated.mp4"          # the index (moov) is at the end: lost
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    cut_data = tmp_path / "cut_data.mp4"            # the index first, half the frames lost
    cut_data.write_bytes(fast.read_bytes()[:fast.stat().st_size // 2])
    audio_only = tmp_path / "voice.mp4"
    container = av.open(str(audio_only), "w")
    stream = container.add_stream("aac", rate=16000, layout="mono")
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 16000, 0
    container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
    container.close()
    return {"missing": (tmp_path / "missing.mp4", "video not found"),
            "text": (text, "not a readable video"),
            "truncated": (truncated, "not a readable video"),
            "cut_data": (cut_data, "corrupt video data"),
            "audio_only": (audio_only, "no video stream")}


def test_bad_input_is_one_line_and_writes_nothing(images, tmp_path, capsys, monkeypatch):
    (tmp_path / "in").mkdir()
    cases = bad_clips(tmp_path / "in", images)
    # the corrupt-data case is found while decoding, after the model loaded: use a fake
    monkeypatch.setattr(cv, "photo_captioner", lambda *a: FakeCaptioner(images))
    out_dir = tmp_path / "out"
    for name, (clip, expected) in cases.items():
        out_dir.mkdir()
        rc = run_cli(cv.main, [str(clip), "--srt", str(out_dir / "a.srt"), "--vtt",
                               str(out_dir / "a.vtt"), "--burn", str(out_dir / "a.mp4")])
        out, err = capsys.readouterr()
        assert rc == 1, name
        assert out == "" and len(err.splitlines()) == 1, (name, err)
        assert err.startswith(f"error: {expected}") and clip.name in err, (name, err)
        assert list(out_dir.iterdir()) == [], name
        out_dir.rmdir()


@pytest.mark.parametrize("where", ["captioning", "burning"])
def test_ctrl_c_leaves_no_file(three_clip, images, tmp_path, capsys, monkeypatch, where):
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10 or where == "captioning":
            raise KeyboardInterrupt
    if where == "captioning":
        monkeypatch.setattr(cv, "photo_captioner", lambda *a: interrupt)
    else:
        monkeypatch.setattr(cv, "photo_captioner", lambda *a: FakeCaptioner(images))
        monkeypatch.setattr(video, "draw_caption", interrupt)
    rc = run_cli(cv.main, [str(three_clip), "--srt", str(tmp_path / "a.srt"),
                           "--burn", str(tmp_path / "a.mp4")])
    assert rc == 130
    assert "complete outputs: nothing" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- the real captioner stack ------------------------------------------------------------------
def tiny_extractor(weights=None, **kwargs):
    """Stands in for VGG16 fc2 (same input, 16-d output): 4x4 average colours, a fixed
    random projection. Coarse colours survive H.264, so frame and photo agree."""
    import keras
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Flatten()(keras.layers.AveragePooling2D(56)(inputs))
    dense = keras.layers.Dense(16, use_bias=False)
    model = keras.Model(inputs, dense(x))
    rng = np.random.default_rng(7)
    dense.set_weights([rng.normal(0, 1 / 48 ** 0.5 / 30, (48, 16)).astype(np.float32)])
    return model


def mean_colour_extractor(weights=None, **kwargs):
    """A 3-d "extractor" (the mean colour), for a model trained on 16-d features."""
    import keras
    return keras.Sequential([keras.Input((224, 224, 3)), keras.layers.GlobalAveragePooling2D()])


@pytest.mark.slow
def test_real_captioner_matches_photo_captions(three_clip, flickr8k_dir, tmp_path, capsys,
                                               monkeypatch):
    import generate_caption as gc
    from captioning.encoders import backbones
    from helpers import make_tiny_run
    data_dir, model_dir, _, _ = make_tiny_run(tmp_path, feature_dim=16)
    monkeypatch.setattr(backbones, "build", lambda *a, **k: tiny_extractor())
    photos = [str(flickr8k_dir / "Flicker8k_Dataset" / f"{n}.jpg") for n in IMAGE_NAMES]
    common = ["--model", str(model_dir), "--data-dir", str(data_dir), "--weights", "none"]
    capsys.readouterr()
    assert gc.main(photos + common) == 0
    photo_captions = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    assert len(set(photo_captions)) == 3                       # three different captions
    srt_path = tmp_path / "clip.srt"
    assert cv.main([str(three_clip), "--srt", str(srt_path)] + common) == 0
    cues = parse_srt(srt_path.read_text())
    assert [text for _, _, text in cues] == photo_captions
    assert [start for start, _, _ in cues] == [0.0, 2.0, 4.0]
    assert "3 scenes -> 3 captions" in capsys.readouterr().out
    # an extractor of another width than the model's features: one line, nothing written
    monkeypatch.setattr(backbones, "build", lambda *a, **k: mean_colour_extractor())
    rc = run_cli(cv.main, [str(three_clip), "--vtt", str(tmp_path / "x.vtt")] + common)
    err = capsys.readouterr().err
    assert rc == 1 and not (tmp_path / "x.vtt").exists()
    assert err.count("\n") == 1 and "16-d features but the image encoder gives 3-d" in err
