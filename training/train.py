"""Fine-tune Qwen2.5-VL + VGGT with HF Trainer, VGGT features from the cache or computed online.

    python -m vggt_cache.training.train --data_root /data/train --output_dir out --bf16 [TrainingArguments...]
    torchrun --nproc_per_node 8 -m vggt_cache.training.train ...   # what training/scripts/train_h800.sh runs
    USE_VGGT_CACHE=true VGGT_SERVICE_URL=http://gpu-node:8600 python -m vggt_cache.training.train ...

With the cache on, every sample's current-frame features are read from
``<image>.vggt_cache.pt``; misses go to the feature service, and what it cannot
provide is computed online by the frozen VGGT in the model (``--vggt_cache_fallback
online``, the default) or stops the run with instructions (``error``). The run logs how
many samples took each path. Checkpoints hold Qwen (transformers' format), the merger
and the fusion settings, never the VGGT weights (the spec's fingerprint names them).

``--tiny`` (or ``VGGT_TRAIN_TINY=1``) builds a tiny random Qwen2.5-VL, a character-level
tokenizer and the image processor in-process, and defaults to the built-in ``tiny`` VGGT
(the one ``vggt-cache serve --model tiny`` serves): no downloads, for tests, benchmarks and a CPU.

Limits: DeepSpeed ZeRO-3 is refused (the frozen VGGT must stay whole on every rank).
DeepSpeed's own engine checkpoints (optimizer state) include the module's weights, and
its bf16 mode casts VGGT's weights too, so online features then differ slightly from
the service's (float32 weights under bf16 autocast); plain DDP (the default) has neither issue.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Trainer,
    TrainingArguments,
)

from vggt_cache.client.cache import CacheUnavailable, FeatureCache
from vggt_cache.client.logs import setup_logging
from vggt_cache.client.lookup import NO_SERVICE
from vggt_cache.client.service import ServiceClient, ServiceError
from vggt_cache.client.spec import FeatureSpec, matching_preset
from vggt_cache.service.model import DEFAULT_SOURCE, TINY_SOURCE, load_aggregator
from vggt_cache.service.settings import DEFAULT_PORT
from vggt_cache.service.sources import UnitPlanner
from vggt_cache.service.specflags import serve_flags
from vggt_cache.training.arguments import CacheArguments, DataArguments, ModelArguments, feature_spec
from vggt_cache.training.data import VGGTCollator, VLNDataset, load_samples
from vggt_cache.training.model import FUSION_FILE, MERGER_FILE, Qwen25VLWithVGGT
from vggt_cache.training.tiny import tiny_qwen25vl_config

log = logging.getLogger("vggt_cache")

SOURCES = ("cache", "service", "online")
EXIT_NO_FEATURES = 2


@dataclass
class QwenParts:
    model: Qwen2_5_VLForConditionalGeneration
    tokenizer: PreTrainedTokenizerFast
    image_processor: Qwen2VLImageProcessorPil


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with Qwen2.5-VL's special tokens, laid out for :func:`tiny_config`.

    Ids: ``<|endoftext|>`` (pad) 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2, ``<unk>`` 3, printable
    ASCII and newline, then ``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_start|>``,
    ``<|vision_end|>`` as the tiny config's top four ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    head = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = ["\n", *map(chr, range(32, 127))]
    tail = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    vocab = {token: i for i, token in enumerate(head + chars + tail)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    specials = [t for t in head + tail if t != "<unk>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=specials,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    return tiny_qwen25vl_config(vocab_size=len(tokenizer))


def tiny_image_processor(config: Qwen2_5_VLConfig) -> Qwen2VLImageProcessorPil:
    vision = config.vision_config
    return Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )


def vggt_source(model_args: ModelArguments) -> str:
    return model_args.vggt_model_path or (TINY_SOURCE if model_args.tiny else DEFAULT_SOURCE)


def build_qwen(model_args: ModelArguments, training_args: TrainingArguments) -> QwenParts:
    """Qwen2.5-VL, its tokenizer and its image processor (tiny and random with ``--tiny``)."""
    if model_args.tiny:
        tokenizer = tiny_tokenizer()
        config = tiny_config(tokenizer)
        torch.manual_seed(training_args.seed)
        return QwenParts(Qwen2_5_VLForConditionalGeneration(config), tokenizer, tiny_image_processor(config))
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    extra = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_args.model_name_or_path, dtype=dtype, **extra)
    return QwenParts(
        qwen,
        AutoTokenizer.from_pretrained(model_args.model_name_or_path),
        Qwen2VLImageProcessorPil.from_pretrained(model_args.model_name_or_path),
    )


class VGGTTrainer(Trainer):
    """HF Trainer that counts where each sample's VGGT features came from and saves without VGGT."""

    def __init__(self, *args, image_processor: Qwen2VLImageProcessorPil | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.image_processor = image_processor
        self.vggt_sources: Counter[str] = Counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        self.vggt_sources.update(s for s in inputs.pop("vggt_source", ()) if s is not None)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add this rank's running counts
            logs.update({f"vggt_{source}": self.vggt_sources[source] for source in SOURCES})
        super().log(logs, start_time)

    def vggt_source_totals(self) -> dict[str, int]:
        """Samples per feature source over every rank."""
        counts = torch.tensor([self.vggt_sources[s] for s in SOURCES], device=self.args.device)
        return dict(zip(SOURCES, self.accelerator.reduce(counts, reduction="sum").tolist(), strict=True))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # The model saves Qwen + merger + fusion settings itself; whatever state_dict the
        # caller gathered would include the frozen VGGT.
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        for part in (self.processing_class, self.image_processor):
            if part is not None:
                part.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        ckpt = Path(resume_from_checkpoint)
        saved_spec = json.loads((ckpt / FUSION_FILE).read_text())["spec"]
        if saved_spec != model.spec.to_dict():
            raise ValueError(
                f"checkpoint {ckpt} was trained with another VGGT feature spec "
                f"(differs in: {', '.join(model.spec.differences(FeatureSpec.from_dict(saved_spec)))})"
            )
        saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=model.qwen.dtype)
        model.qwen.load_state_dict(saved.state_dict())
        model.merger.load_state_dict(load_file(ckpt / MERGER_FILE))


def serve_command(spec: FeatureSpec, vggt: str, data_root: str) -> str:
    """A ``vggt-cache serve`` line whose features this run can use, on whatever machine runs it (`--device auto`)."""
    return (
        f"vggt-cache serve --model {vggt} --host 0.0.0.0 --port {DEFAULT_PORT} "
        f"--allowed-root {data_root} {serve_flags(spec)}"
    )


def missing_features_help(spec: FeatureSpec, vggt: str, data: DataArguments) -> str:
    root = os.path.abspath(data.data_root)
    data_path = f" --data_path {data.data_path}" if data.data_path else ""
    return (
        f"Start a feature service with this run's spec and point VGGT_SERVICE_URL at it:\n"
        f"  {serve_command(spec, vggt, root)}\n"
        f"  export VGGT_SERVICE_URL=http://<service host>:{DEFAULT_PORT}\n"
        f"or precompute every feature first:\n"
        f"  vggt-cache precompute --data_root {root} --vggt_model_path {vggt}{data_path} --skip_existing "
        f"{serve_flags(spec)}\n"
        f"or pass --vggt_cache_fallback online to compute missing features during training."
    )


def check_services(urls: Sequence[str], spec: FeatureSpec, fallback: str, serve: str) -> list[str]:
    """The services to send misses to: those not known to compute with another spec.

    A service with another spec is an error unless the fallback is ``online``, which leaves
    it out (its answers could never be used). An unreachable service is only reported: it
    may come up later, and the fallback decides what a miss does meanwhile.
    """
    usable = []
    for url in urls:
        try:
            with ServiceClient(url, timeout=10) as service:
                theirs = service.spec()
        except (ServiceError, ValueError, TypeError) as exc:  # unreachable, or no model loaded yet
            log.warning(
                "Cannot read the VGGT feature service's spec at %s (%s); fallback for misses: %s", url, exc, fallback
            )
            usable.append(url)
            continue
        if theirs.digest != spec.digest:
            message = (
                f"The VGGT feature service at {url} computes features with another spec than this run "
                f"(differs in: {', '.join(spec.differences(theirs))}); none of its features can be used. "
                f"Start it with this run's spec: {serve}"
            )
            if fallback != "online":
                raise CacheUnavailable(message)
            log.warning("%s. Meanwhile missing features are computed online.", message)
        else:
            usable.append(url)
    return usable


# The flags a first run needs, shown first in --help (the rest: one group per dataclass, then transformers').
FIRST_FLAGS = (
    "--data_root",
    "--output_dir",
    "--model_name_or_path",
    "--vggt_model_path",
    "--tiny",
    "--use_vggt_cache",
    "--vggt_service_url",
    "--vggt_preset",
    "--per_device_train_batch_size",
    "--max_steps",
)


def build_parser() -> HfArgumentParser:
    """The arguments of ``training.train``; ``--help`` starts with :data:`FIRST_FLAGS`, then groups the rest."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, CacheArguments, TrainingArguments),
        prog="python -m vggt_cache.training.train",
        usage="%(prog)s --data_root DIR --output_dir DIR [FLAGS] (or under torchrun)",
        description="Fine-tune Qwen2.5-VL + VGGT, VGGT features from the cache or computed "
        "online (see the README's 'Training with the cache').",
    )
    hf = parser.add_argument_group(
        "transformers' TrainingArguments: the rest of the run (optimiser, precision, logging, saving, distributed)"
    )
    _move(parser, [a for a in parser._optionals._group_actions if a.dest != "help"], hf)
    first = parser.add_argument_group("start here: the flags a first run needs")
    _move(parser, [parser._option_string_actions[flag] for flag in FIRST_FLAGS], first)
    parser._action_groups.remove(first)
    parser._action_groups.insert(parser._action_groups.index(parser._optionals) + 1, first)
    return parser


def _move(parser: HfArgumentParser, actions: list, group) -> None:
    """Show `actions` under `group` in --help (argparse has no public way to regroup an argument)."""
    for action in actions:
        for old in parser._action_groups:
            if action in old._group_actions:
                old._group_actions.remove(action)
        group._group_actions.append(action)


def parse_args(argv: Sequence[str] | None = None):
    parser = build_parser()
    model_args, data_args, cache_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if not data_args.data_root:
        parser.error("--data_root (or $DATA_ROOT) is required")
    # The VGGT inputs are lists (None marks a sample without cached features); keep them.
    training_args.remove_unused_columns = False
    return model_args, data_args, cache_args, training_args


def _refuse_zero3(deepspeed: str | dict | None) -> None:
    if not deepspeed:
        return
    config = deepspeed if isinstance(deepspeed, dict) else json.loads(Path(deepspeed).read_text())
    if config.get("zero_optimization", {}).get("stage") == 3:
        raise ValueError(
            "DeepSpeed ZeRO-3 would shard the frozen VGGT, which computes features on every rank; use ZeRO-2 (or none)"
        )


def open_cache(cache_args: CacheArguments, spec: FeatureSpec, serve: str) -> FeatureCache | None:
    """The run's FeatureCache (None with the cache off), after checking the services' spec."""
    if not cache_args.use_vggt_cache:
        log.info("VGGT feature cache disabled: computing VGGT features online (set USE_VGGT_CACHE=true to use it)")
        return None
    fallback = cache_args.vggt_cache_fallback
    urls = check_services(cache_args.service_urls, spec, fallback, serve)
    left_out = [url for url in cache_args.service_urls if url not in urls]
    reason = (
        f"the service at {', '.join(left_out)} computes another spec (see the warning above)"
        if left_out
        else NO_SERVICE
    )
    # logs the seed's "enabled" line
    cache = FeatureCache(urls or None, spec, fallback=fallback, no_service_reason=reason)
    log.info(
        "VGGT feature spec %s (%s attention, reference frame %s%s); service: %s; fallback: %s",
        spec.digest,
        spec.attention,
        spec.reference_frame,
        f", preset {matching_preset(spec)}" if matching_preset(spec) else "",
        ", ".join(urls) or "none (read-only cache)",
        fallback,
    )
    return cache


def warn_shared_targets(samples: Sequence, attention: str) -> None:
    """One sibling file holds one context: images that several clips target keep overwriting each other."""
    planner = UnitPlanner(attention)
    for sample in samples:
        planner.add_clip(list(sample.clip))
    if planner.conflicts:
        log.warning(
            "%d image(s) get a %s entry from more than one clip; a cache file holds one context, "
            "so those are recomputed whenever another clip asks for them",
            planner.conflicts,
            attention,
        )


def main(argv: Sequence[str] | None = None) -> int:
    model_args, data_args, cache_args, training_args = parse_args(argv)
    setup_logging(main_process=training_args.should_log)
    _refuse_zero3(training_args.deepspeed)
    vggt_path = vggt_source(model_args)
    # Float32 weights, as the service loads them; Trainer moves them to the device.
    vggt = load_aggregator(vggt_path)
    spec = feature_spec(vggt, data_args, cache_args)
    samples = load_samples(
        data_args.data_root, data_args.sample_files, data_args.data_path, data_args.max_history_images
    )
    if cache_args.use_vggt_cache:
        warn_shared_targets(samples, spec.attention)
    try:
        cache = open_cache(cache_args, spec, serve_command(spec, vggt_path, os.path.abspath(data_args.data_root)))
        qwen = build_qwen(model_args, training_args)
        model = Qwen25VLWithVGGT(qwen.model, vggt, spec, model_args.fusion)
        dataset = VLNDataset(
            samples,
            qwen.tokenizer,
            qwen.image_processor,
            qwen.model.config,
            spec,
            cache,
            data_args.qwen_images,
            data_args.system_prompt,
        )
        trainer = VGGTTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            data_collator=VGGTCollator(qwen.tokenizer.pad_token_id),
            processing_class=qwen.tokenizer,
            image_processor=qwen.image_processor,
        )
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except CacheUnavailable as exc:
        log.error("%s\n%s", exc, missing_features_help(spec, vggt_path, data_args))
        return EXIT_NO_FEATURES
    trainer.save_model()
    totals = trainer.vggt_source_totals()
    log.info(
        "VGGT features by source over %d sample(s): %s",
        sum(totals.values()),
        ", ".join(f"{k}={v}" for k, v in totals.items()),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
