"""Tiny random PPLLaVA models and model-ready inputs, built without a processor (placeholders expanded by hand)."""

import copy

import torch

from ppllava_hf import PPLLaVAForConditionalGeneration
from ppllava_hf.models.ppllava.token_counts_ppllava import num_anyres_tiles
from ppllava_hf.testing.tiny import tiny_config


def record_calls(module, measure):
    """Hook `module`: every call appends `measure(first input)` (positional or keyword) to the returned list; remove
    the handle when done."""
    sizes = []

    def hook(_, args, kwargs):
        sizes.append(measure(args[0] if args else next(iter(kwargs.values()))))

    return sizes, module.register_forward_pre_hook(hook, with_kwargs=True)


def record_pooling_windows(model):
    """Hook the prompt-guided pooling of a `PPLLaVAModel`: every call appends its `(kernel, stride)`; remove the handle
    when done."""
    windows = []

    def hook(_, args):
        windows.append((tuple(args[2]), tuple(args[3])))

    return windows, model.multi_modal_projector.pooling.register_forward_pre_hook(hook)


class PPLLaVAModelTester:
    """Builds a tiny model of one layout and batches of video / image / text-only samples for it."""

    def __init__(self, layout: str = "vicuna", seed: int = 0, **config_overrides):
        self.layout = layout
        self.config = tiny_config(layout, **config_overrides)
        torch.manual_seed(seed)
        self.model = PPLLaVAForConditionalGeneration(self.config).eval()
        self.generator = torch.Generator().manual_seed(seed + 1)

    def fresh_model(self, attn_implementation: str | None = None, **config_overrides) -> PPLLaVAForConditionalGeneration:
        """A new model with the tester model's weights, built from a private copy of the config (saving a model writes
        its dtype into the config object, which must not leak between tests)."""
        config = copy.deepcopy(self.config)
        for name, value in config_overrides.items():
            setattr(config, name, value)
        model = PPLLaVAForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
        model.load_state_dict(self.model.state_dict())
        return model.eval()

    @property
    def prompt_length(self) -> int:
        return self.config.prompt_encoder_config.max_position_embeddings

    def text(self, length: int) -> list[int]:
        """Random ordinary token ids (never a placeholder, pad, BOS or EOS)."""
        return torch.randint(3, 250, (length,), generator=self.generator).tolist()

    def video(self, frames: int = 8) -> torch.Tensor:
        size = self.config.vision_config.image_size
        return torch.randn(frames, 3, size, size, generator=self.generator)

    def image(self, height: int = 100, width: int = 180) -> tuple[torch.Tensor, torch.Tensor]:
        """Anyres tiles `(tiles, 3, tile, tile)` of random pixels for an image of that size, and the size."""
        size = (height, width)
        tile = self.config.vision_config.image_size
        tiles = num_anyres_tiles(size, self.config.image_grid_pinpoints, tile)
        return torch.randn(tiles, 3, tile, tile, generator=self.generator), torch.tensor(size)

    def prompt(self, words: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-encoder ids in the CLIP layout (<sot> words <eot> padded with <eot>) and their mask."""
        vocab = self.config.prompt_encoder_config.vocab_size
        sot, eot = vocab - 2, vocab - 1
        ids = [sot] + torch.randint(3, vocab - 3, (words,), generator=self.generator).tolist() + [eot]
        mask = [1] * len(ids) + [0] * (self.prompt_length - len(ids))
        ids = ids + [eot] * (self.prompt_length - len(ids))
        return torch.tensor(ids), torch.tensor(mask)

    def video_sample(self, frames: int = 8, before: int = 3, after: int = 4) -> dict:
        count = self.model.model.video_pooling_plan(frames).num_tokens
        ids = [1] + self.text(before) + [self.config.video_token_id] * count + self.text(after)
        clip_ids, clip_mask = self.prompt()
        return {"ids": ids, "video": self.video(frames), "clip_ids": clip_ids, "clip_mask": clip_mask}

    def image_sample(self, height: int = 100, width: int = 180) -> dict:
        tiles, size = self.image(height, width)
        count = self.model.model.num_image_tokens(tuple(size.tolist()))
        ids = [1] + self.text(2) + [self.config.image_token_id] * count + self.text(3)
        clip_ids, clip_mask = self.prompt()
        return {"ids": ids, "image": tiles, "image_size": size, "clip_ids": clip_ids, "clip_mask": clip_mask}

    def text_sample(self, length: int = 7) -> dict:
        clip_ids, clip_mask = self.prompt()
        return {"ids": [1] + self.text(length), "clip_ids": clip_ids, "clip_mask": clip_mask}

    @staticmethod
    def collate(samples: list[dict], padding_side: str = "left") -> dict:
        """Model inputs for a batch of samples, padded with id 0 on `padding_side`."""
        length = max(len(sample["ids"]) for sample in samples)
        ids, mask = [], []
        for sample in samples:
            pad = [0] * (length - len(sample["ids"]))
            ones = [1] * len(sample["ids"])
            ids.append(pad + sample["ids"] if padding_side == "left" else sample["ids"] + pad)
            mask.append([0] * len(pad) + ones if padding_side == "left" else ones + [0] * len(pad))
        batch = {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "clip_input_ids": torch.stack([sample["clip_ids"] for sample in samples]),
            "clip_attention_mask": torch.stack([sample["clip_mask"] for sample in samples]),
        }
        videos = [sample["video"] for sample in samples if "video" in sample]
        if videos:
            same = len({video.shape for video in videos}) == 1
            batch["pixel_values_videos"] = torch.stack(videos) if same else videos
        images = [sample for sample in samples if "image" in sample]
        if images:
            most = max(sample["image"].shape[0] for sample in images)
            padded = [torch.cat([s["image"], s["image"].new_zeros(most - s["image"].shape[0], *s["image"].shape[1:])]) for s in images]
            batch["pixel_values"] = torch.stack(padded)
            batch["image_sizes"] = torch.stack([sample["image_size"] for sample in images])
        return batch
