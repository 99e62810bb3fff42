"""Training data: sources (WebVid CSV, synthetic motion, TFDS clips) and the grain loader.

`adiff_jax.data.tfds_video` is not imported here: it pulls in tensorflow_datasets.
"""
from adiff_jax.data.loader import (
    ClipConfig, ClipTransform, clip_indices, collate, frame_indices, make_train_loader,
    resize_center_crop, shard_dataset, to_model_range)
from adiff_jax.data.synthetic import (
    COLORS, DIRECTIONS, SHAPES, ClipParams, SyntheticMotionSource, caption_for, motion_direction,
    motion_displacement, object_centroid, object_color, render_clip, sample_params,
    trail_direction)
from adiff_jax.data.webvid import VideoTooShort, WebVidSource, read_video_frames, write_video
