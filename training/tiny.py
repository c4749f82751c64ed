"""A tiny random Qwen2.5-VL and its inputs, for tests and benchmarks (no downloads).

The special tokens sit at the top of the vocabulary; images are 28-aligned
float tensors in ``[0, 1]`` that Qwen's image processor takes as they are
(no resize, no rescale), so an ``H x W`` image gives ``(H/28)*(W/28)`` tokens,
exactly the merged VGGT grid of the same image.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessorPil

PAD, BOS, EOS = 0, 1, 2
IGNORE_INDEX = -100


def tiny_qwen25vl_config(
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config with the real layout (patch 14, 2x2 merge, M-RoPE) and toy widths."""
    half_head = hidden_size // num_heads // 2
    # Qwen2.5-VL splits the rotary half-dimension t:h:w = 2:3:3 ([16, 24, 24] for head_dim 128).
    spatial = 3 * half_head // 8
    mrope_section = [half_head - 2 * spatial, spatial, spatial]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_heads=vision_heads,
            out_hidden_size=hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        image_token_id=vocab_size - 4,
        video_token_id=vocab_size - 3,
        vision_start_token_id=vocab_size - 2,
        vision_end_token_id=vocab_size - 1,
    )


def tiny_batch(
    config: Qwen2_5_VLConfig,
    samples: list[list[Tensor]],
    prompt_len: int = 3,
    answer_len: int = 4,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Tokens, labels and pixels for ``samples`` (each a list of ``[3, H, W]`` images, last = current).

    Each row is ``BOS prompt (<vision_start> <image_pad>*n <vision_end>)* answer EOS``,
    right-padded; only the answer and EOS are labelled. Keys: ``input_ids``,
    ``attention_mask``, ``labels``, ``pixel_values``, ``image_grid_thw``.
    """
    g = torch.Generator().manual_seed(seed)
    words = config.image_token_id - 3  # ordinary tokens are 3 .. image_token_id - 1
    images = [img for sample in samples for img in sample]
    vision = image_inputs(images, config) if images else {}
    merge = config.vision_config.spatial_merge_size
    image_tokens = iter((vision["image_grid_thw"].prod(-1) // merge**2).tolist() if images else [])
    rows, label_rows = [], []
    for sample in samples:
        prompt = (torch.randint(0, words, (prompt_len,), generator=g) + 3).tolist()
        answer = (torch.randint(0, words, (answer_len,), generator=g) + 3).tolist()
        ids = [BOS, *prompt]
        for _ in sample:
            image = [config.image_token_id] * next(image_tokens)
            ids += [config.vision_start_token_id, *image, config.vision_end_token_id]
        rows.append(ids + answer + [EOS])
        label_rows.append([IGNORE_INDEX] * len(ids) + answer + [EOS])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, label_rows, strict=True)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        attention_mask[b, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **vision}


def image_inputs(images: list[Tensor], config: Qwen2_5_VLConfig) -> dict[str, Tensor]:
    """``pixel_values`` and ``image_grid_thw`` for 28-aligned ``[3, H, W]`` images in ``[0, 1]``."""
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    for img in images:
        if img.shape[-2] % factor or img.shape[-1] % factor:
            raise ValueError(f"image size {tuple(img.shape[-2:])} is not a multiple of {factor}")
    # The torchvision-free processor; no resize (the image is already aligned) and no
    # rescale (values are already in [0, 1]), so the pixels match what VGGT sees.
    processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )
    out = processor(images=images, do_resize=False, do_rescale=False, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
