"""Video preference data: decoding (PyAV), the frame-count rule, one temporal window and crop per pair, collators.

A video in a row is a file path, encoded bytes (mp4, webm, anything FFmpeg reads), a `datasets.Video` value
(`{"bytes", "path"}`, decoded here rather than by torchcodec), or its frames: a list of PIL images / HxWx3 uint8
arrays, or one (F, H, W, 3) uint8 array. A clip of `num_frames` frames is taken `frame_stride` frames apart (or
resampled to `fps`), starting at frame 0, or, with `random_crop`, at a random point. Both videos of a pair get the
SAME window (as a fraction of each video's free frames, so equal-length videos get identical windows), the same
spatial crop and the same flip: `transforms.paired_transform` transforms the frames of both videos with one draw.
"""

import io
import os

import numpy as np
import torch
from PIL import Image

from .collators import PreferenceCollator, UnpairedCollator
from .transforms import paired_transform

VIDEO_EXTRA = 'pip install "diffusion-dpo-trainer[video]"'
VIDEO_VALUE = (
    "a path to a video file, encoded video bytes, a datasets.Video value, a list of frames (PIL images or HxWx3 "
    "uint8 arrays) or an (F, H, W, 3) uint8 array"
)


def _av():
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"Reading and writing videos needs PyAV: {VIDEO_EXTRA}") from exc
    return av


def check_num_frames(num_frames: int, temporal_compression: int) -> None:
    """A VAE that compresses time by t encodes k*t + 1 frames to k + 1 latent frames; other counts are refused with
    the nearest valid ones named."""
    if num_frames >= 1 and (num_frames - 1) % temporal_compression == 0:
        return
    below = max(1, (num_frames - 1) // temporal_compression * temporal_compression + 1)
    above = below + temporal_compression if num_frames > below else below
    nearest = f"{below} or {above}" if above != below else f"{below}"
    raise ValueError(
        f"num_frames={num_frames} does not fit the VAE's temporal compression of {temporal_compression}: clips must "
        f"have k*{temporal_compression} + 1 frames (e.g. {temporal_compression + 1}, {4 * temporal_compression + 1}, "
        f"{20 * temporal_compression + 1}). Nearest valid counts: {nearest}."
    )


def encode_video(frames, fps: int = 16, container: str = "mp4") -> bytes:
    """Encode frames ((F, H, W, 3) uint8, or a list of PIL images / arrays) to mp4 (H.264) or webm (VP9) bytes."""
    av = _av()
    frames = [np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame, dtype=np.uint8)
              for frame in frames]
    codec = {"mp4": "libx264", "webm": "libvpx-vp9"}[container]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if container == "mp4":
            stream.options = {"crf": "10"}  # near-lossless: pairs keep what the reward saw
        for frame in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())
    return buffer.getvalue()


class _Video:
    """One video of a row: its frame count, its frame rate (None for bare frames) and the frames of a window."""

    def __init__(self, value, row: int, column: str):
        self.row, self.column = row, column
        self.frames_list = None
        self.source = None
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            value = value["bytes"] or value["path"]
        if isinstance(value, np.ndarray) and value.ndim == 4:
            value = list(value)
        if isinstance(value, (list, tuple)) and value:
            self.frames_list, self.fps = list(value), None
            self.num_frames = len(self.frames_list)
        elif isinstance(value, (bytes, bytearray, str, os.PathLike)):
            self.source = value
            self._probe()
        else:
            self._fail(TypeError(f"unsupported value of type {type(value).__name__}"))

    def _fail(self, exc):
        raise ValueError(
            f"Row {self.row}, column {self.column!r}: could not read a video ({exc}). Expected {VIDEO_VALUE}."
        ) from exc

    def _open(self):
        av = _av()
        source = io.BytesIO(self.source) if isinstance(self.source, (bytes, bytearray)) else os.fspath(self.source)
        return av.open(source)

    def _probe(self) -> None:
        try:
            with self._open() as container:
                stream = container.streams.video[0]
                self.fps = float(stream.average_rate) if stream.average_rate else None
                # Containers such as webm do not store the count: count the packets (no decoding).
                self.num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        except Exception as exc:  # PyAV raises several unrelated types for bad data
            self._fail(exc)

    def frames(self, indices: list[int], resolution: int) -> list[Image.Image]:
        """The frames at `indices` as RGB images; decoded frames are scaled to a short side of `resolution` at once,
        so a long high-resolution video never sits in memory at full size."""
        if self.frames_list is not None:
            return [_as_image(self.frames_list[i], self.row, self.column) for i in indices]
        wanted, found = set(indices), {}
        try:
            with self._open() as container:
                for index, frame in enumerate(container.decode(container.streams.video[0])):
                    if index in wanted:
                        scale = resolution / min(frame.width, frame.height)
                        found[index] = frame.to_image(width=max(resolution, round(frame.width * scale)),
                                                      height=max(resolution, round(frame.height * scale)),
                                                      interpolation="BICUBIC")  # as images are resized
                    if index >= indices[-1]:
                        break
        except Exception as exc:
            self._fail(exc)
        if len(found) < len(wanted):
            self._fail(ValueError(f"decoded only {len(found)} of the {len(wanted)} frames of the clip"))
        return [found[i] for i in indices]


def _as_image(frame, row: int, column: str) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"Row {row}, column {column!r}: a frame must be a PIL image or an HxWx3 uint8 array, got an array of "
            f"shape {array.shape} and dtype {array.dtype}."
        )
    return Image.fromarray(array)


def clip_indices(video: _Video, num_frames: int, frame_stride: int, fps: float | None, fraction: float) -> list[int]:
    """Frame indices of the clip: `num_frames` frames `frame_stride` apart (or `source fps / fps` apart), starting
    at `fraction` of the frames left free by the clip (0: the first frame)."""
    step = float(frame_stride)
    if fps is not None:
        if video.fps is None:
            raise ValueError(f"Row {video.row}, column {video.column!r}: the video has no frame rate (a list of "
                             "frames), so video_fps cannot resample it; use frame_stride instead.")
        step = video.fps / fps
        if step < 1:
            raise ValueError(f"Row {video.row}, column {video.column!r}: video_fps={fps:g} is above the video's own "
                             f"{video.fps:g} fps; frames would repeat.")
    span = round((num_frames - 1) * step) + 1
    if video.num_frames < span:
        raise ValueError(
            f"Row {video.row}, column {video.column!r}: the video has {video.num_frames} frames, but a clip of "
            f"num_frames={num_frames} every {step:g} frames needs {span}."
        )
    start = round(fraction * (video.num_frames - span))
    return [start + round(i * step) for i in range(num_frames)]


def paired_video_transform(videos: list[_Video], num_frames: int, resolution: int, frame_stride: int = 1,
                           fps: float | None = None, random_crop: bool = False, random_flip: bool = False,
                           generator=None):
    """Clips of the videos of one row with ONE draw of temporal window, crop position and flip for all of them.

    Returns, per video, pixels (C, F, H, W) in [-1, 1], the original (h, w) and the crop's (top, left), as
    `transforms.paired_transform` does per image. The window is drawn first, then the crop and flip.
    """
    fraction = torch.rand((), generator=generator).item() if random_crop else 0.0
    clips = [video.frames(clip_indices(video, num_frames, frame_stride, fps, fraction), resolution)
             for video in videos]
    # One call for every frame of every video: one crop and one flip for all of them.
    pixels, sizes, crops = paired_transform([f for clip in clips for f in clip], resolution, random_crop,
                                            random_flip, generator)
    return ([torch.stack(pixels[i * num_frames:(i + 1) * num_frames], dim=1) for i in range(len(videos))],
            sizes[::num_frames], crops[::num_frames])


class VideoPreferenceCollator(PreferenceCollator):
    """`PreferenceCollator` for video pairs: `chosen_pixel_values` etc. are (B, C, F, H, W); cached rows and
    prompt embeddings are handled by the parent."""

    def __init__(self, resolution: int, num_frames: int, frame_stride: int = 1, fps: float | None = None,
                 random_crop: bool = False, random_flip: bool = False, prompt_embeddings=None,
                 proportion_empty_prompts: float = 0.0, seed: int = 0):
        super().__init__(resolution, random_crop, random_flip, prompt_embeddings, proportion_empty_prompts, seed)
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}.")
        if fps is not None and frame_stride != 1:
            raise ValueError("Set either video_fps or frame_stride, not both: video_fps sets the stride per video.")
        self.num_frames, self.frame_stride, self.fps = num_frames, frame_stride, fps

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        return (3, self.num_frames, self.resolution, self.resolution)

    @property
    def transform_settings(self) -> tuple:
        return (self.num_frames, self.frame_stride, self.fps)

    def transform(self, row: dict, index: int, random_flip: bool, generator=None) -> dict:
        videos = [_Video(row[side], index, side) for side in self.image_columns]
        pixels, sizes, crops = paired_video_transform(videos, self.num_frames, self.resolution, self.frame_stride,
                                                      self.fps, self.random_crop, random_flip, generator)
        return {
            side: {"pixel_values": px, "original_size": size, "crop_top_left": crop}
            for side, px, size, crop in zip(self.image_columns, pixels, sizes, crops)
        }


class VideoUnpairedCollator(VideoPreferenceCollator, UnpairedCollator):
    """Unpaired labelled videos (KTO): one `video` per row with its own window, crop and flip; keys as in
    `UnpairedCollator`."""

    image_columns = ("video",)
