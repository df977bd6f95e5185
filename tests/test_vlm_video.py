"""Videos across pipeline stages (issue 24): batches that mix images, videos and text-only samples are cut into
microbatches by sample (Qwen2.5-VL: patches of the whole batch with a grid per video and its frame timing;
LlavaNext-Video: one row per video), and the split model equals the unsplit one."""

import warnings

import pytest
import torch

from helpers.vlm_models import BOS, PAD, TEXT_IDS, VLM_CASES
from helpers.vlm_parity import split_parity
from hf_pp.architectures import stage_layout
from hf_pp.multimodal import multimodal_stage_inputs, stage_image_inputs

# Per sample: what it shows, in prompt order ("i" an image, "v" a video), and its text length.
SAMPLES = (("iv", 5), ("", 7), ("vv", 4), ("i", 6))


def _qwen_visual(model, kind: str, index: int, g):
    """(pixel rows, grid row, placeholder count) of one image (1x4x4 patches) or video (2 frames of 4x4)."""
    vision = model.config.vision_config
    grid = torch.tensor([[1, 4, 4]]) if kind == "i" else torch.tensor([[2, 4, 2 + 2 * (index % 2)]])
    dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    rows = torch.randn(int(grid.prod()), dim, generator=g)
    return rows, grid, int(grid.prod()) // vision.spatial_merge_size ** 2


def qwen_video_batch(model, seed: int = 0) -> dict:
    """A Qwen2.5-VL batch as its processor gives it: images and videos, each between vision_start and vision_end."""
    config, g = model.config, torch.Generator().manual_seed(seed)
    rows, types, pixels, grids, videos, video_grids, seconds = [], [], [], [], [], [], []
    for sample, (shown, length) in enumerate(SAMPLES):
        ids, kinds = [BOS], [0]
        for index, kind in enumerate(shown):
            pix, grid, n = _qwen_visual(model, kind, sample + index, g)
            token = config.image_token_id if kind == "i" else config.video_token_id
            ids += [config.vision_start_token_id] + [token] * n + [config.vision_end_token_id]
            kinds += [0] + [1 if kind == "i" else 2] * n + [0]
            (pixels if kind == "i" else videos).append(pix)
            (grids if kind == "i" else video_grids).append(grid)
            if kind == "v":
                seconds.append(0.5 * (1 + index))
        text = torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (length,), generator=g).tolist()
        rows.append(ids + text)
        types.append(kinds + [0] * length)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD)
    mm_types = torch.zeros_like(input_ids)
    for i, (ids, kinds) in enumerate(zip(rows, types)):
        input_ids[i, :len(ids)], mm_types[i, :len(ids)] = torch.tensor(ids), torch.tensor(kinds)
    attention_mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    special = (mm_types > 0) | (input_ids == config.vision_start_token_id) | (input_ids == config.vision_end_token_id)
    labels = input_ids.masked_fill((attention_mask == 0) | special, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, mm_token_type_ids=mm_types,
                pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids), pixel_values_videos=torch.cat(videos),
                video_grid_thw=torch.cat(video_grids), second_per_grid_ts=torch.tensor(seconds))


def llava_next_video_batch(model, seed: int = 0) -> dict:
    """A LlavaNext-Video batch: one row of frames per video (``pixel_values_videos [videos, frames, C, H, W]``)."""
    config, g = model.config, torch.Generator().manual_seed(seed)
    vision = config.vision_config
    counts = [shown.count("v") for shown, _ in SAMPLES]
    frames = torch.randn(sum(counts), 2, vision.num_channels, vision.image_size, vision.image_size, generator=g)
    with torch.no_grad():
        features = model.model.get_video_features(pixel_values_videos=frames)
    per_video = len(getattr(features, "pooler_output", features)[0])
    rows = []
    for (shown, length), count in zip(SAMPLES, counts):
        text = torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (length,), generator=g).tolist()
        rows.append([BOS] + ([config.video_token_index] * per_video + [TEXT_IDS.start]) * count + text)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD)
    for i, ids in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
    attention_mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == config.video_token_index), -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values_videos=frames)


BATCHES = {"qwen2_5_vl": qwen_video_batch, "llava_next_video": llava_next_video_batch}


@pytest.mark.parametrize("model_type", sorted(BATCHES))
def test_videos_are_regrouped_by_sample(model_type):
    model = VLM_CASES[model_type].model()
    batch = BATCHES[model_type](model)
    stage = multimodal_stage_inputs(model, stage_layout(model).multimodal, batch)
    videos = [shown.count("v") for shown, _ in SAMPLES]
    if model_type == "qwen2_5_vl":
        assert stage["multimodal_rows"]["video_grid_thw"].tolist() == videos
        assert stage["multimodal_rows"]["second_per_grid_ts"].tolist() == videos
        # Microbatch of samples 2-3: sample 2's two videos and their timings, sample 3's image.
        mb = stage_image_inputs({k: v[2:] for k, v in stage["multimodal_inputs"].items()},
                                {k: v[2:] for k, v in stage["multimodal_rows"].items()})
        torch.testing.assert_close(mb["video_grid_thw"], batch["video_grid_thw"][1:])
        torch.testing.assert_close(mb["second_per_grid_ts"], batch["second_per_grid_ts"][1:])
        torch.testing.assert_close(mb["pixel_values_videos"], batch["pixel_values_videos"][32:])
        torch.testing.assert_close(mb["image_grid_thw"], batch["image_grid_thw"][1:])
        assert stage["position_ids"].shape[:2] == (4, 3)  # Qwen's 3-D positions, batch first
    else:
        assert stage["multimodal_rows"]["pixel_values_videos"].tolist() == videos
    # A text-only microbatch carries no pixels at all.
    text_only = stage_image_inputs({k: v[1:2] for k, v in stage["multimodal_inputs"].items()},
                                   {k: v[1:2] for k, v in stage["multimodal_rows"].items()})
    assert not [k for k in text_only if k.startswith("pixel_")]


@pytest.mark.parametrize("model_type", sorted(BATCHES))
@pytest.mark.parametrize("num_stages", [2, 4])
def test_a_split_vlm_trains_on_videos_as_the_unsplit_one(model_type, num_stages):
    case = VLM_CASES[model_type]
    model = case.model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert split_parity(model, BATCHES[model_type](model), num_stages, case.vision_tower) is None


@pytest.mark.parametrize("model_type", sorted(BATCHES))
def test_the_videos_reach_the_unsplit_model(model_type):
    model = VLM_CASES[model_type].model().eval()
    batch = BATCHES[model_type](model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
        other = model(**{**inputs, "pixel_values_videos": torch.randn_like(inputs["pixel_values_videos"])}).logits
    assert not torch.allclose(logits, other)  # the fixture's videos are used, so the split tests above test them
