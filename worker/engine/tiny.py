"""Tiny, randomly initialised models in the real on-disk layouts, for tests and demos.

``build_tiny_flux`` writes a folder that ``FluxPipeline.from_pretrained`` reads
exactly like a downloaded FLUX.1-dev (``model_index.json`` plus one sub-folder
per component); ``build_tiny_nsfw_classifier`` writes a folder in the layout of
``Falconsai/nsfw_image_detection`` (ViT, labels ``normal`` / ``nsfw``). Nothing
is downloaded: every weight is random (seeded) and both tokenizers are built
in code with the ``tokenizers`` library (no sentencepiece model file).

The tiny FLUX keeps the real geometry where it matters: a four-level VAE
(``vae_scale_factor`` 8, so image sides must be multiples of 16 as for the real
model), 2x2 latent packing (``in_channels`` = 4 x the VAE's latent channels),
guidance embedding (FLUX.1-dev is guidance-distilled), the real scheduler
config, CLIP with ``model_max_length`` 77 and a T5 encoder that accepts the
512-token sequences FLUX uses. Everything else is as small as it can be.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (  # type: ignore[attr-defined, unused-ignore]  # v5: *Fast aliases
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizerFast,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

SEED = 0
LATENT_CHANNELS = 4
TEXT_DIM = 32  # CLIP hidden size (pooled projection) and T5 d_model (joint attention)
NSFW_LABELS = {0: "normal", 1: "nsfw"}

# FLUX.1-dev's scheduler/scheduler_config.json, verbatim.
_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
_CLIP_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_WORDS = ("a", "an", "the", "of", "cat", "dog", "red", "blue", "photo", "painting", "with")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _clip_tokenizer() -> PreTrainedTokenizerBase:
    """Byte-level BPE over single bytes (plus a few whole words), CLIP's special tokens
    and pre-processing (lower-case, CLIP's split pattern, ``</w>`` word ends)."""
    vocab: dict[str, int] = {}
    for char in _bytes_to_unicode().values():
        vocab[char] = len(vocab)
    for char in list(vocab):
        vocab[char + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # Merge left to right: "c a", "ca t</w>" -> "cat</w>".
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            joined = pieces[0] + pieces[1]
            vocab.setdefault(joined, len(vocab))
            pieces = [joined, *pieces[2:]]
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos] = len(vocab)
    vocab[eos] = len(vocab)
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            unk_token=eos,
            fuse_unk=False,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing(
        (eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False, add_prefix_space=False
    )
    return CLIPTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        unk_token=eos,
        model_max_length=77,
    )


def _t5_tokenizer() -> PreTrainedTokenizerBase:
    """A Unigram vocabulary of letters, digits and a few words, T5's special tokens."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for char in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-":
        pieces.append((char, -5.0))
        pieces.append(("▁" + char, -4.0))
    pieces.extend(("▁" + word, -1.0) for word in _WORDS if len(word) > 1)
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=512,
    )


def _text_encoders(clip_vocab: int, t5_vocab: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=TEXT_DIM,
            bos_token_id=clip_vocab - 2,
            eos_token_id=clip_vocab - 1,
            pad_token_id=clip_vocab - 1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    return clip, t5


def _vae() -> AutoencoderKL:
    # Four levels -> vae_scale_factor 2**3 = 8, as in FLUX.1; no quant convs, FLUX's scale/shift.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def _transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # the pipeline packs 2x2 latent patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )


def build_tiny_flux(path: Path) -> Path:
    """Write a tiny random FLUX.1-dev-layout pipeline to ``path`` and return ``path``.

    Deterministic: the same code writes the same weights. Images from it are
    noise, but every code path of the real pipelines (t2i, img2img, inpaint)
    runs, at 64x64 to 128x128 in well under a second per image on a CPU.
    """
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tokenizer = _clip_tokenizer()
        tokenizer_2 = _t5_tokenizer()
        text_encoder, text_encoder_2 = _text_encoders(len(tokenizer), len(tokenizer_2))
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
            vae=_vae(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=_transformer(),
        )
    pipe.save_pretrained(path, safe_serialization=True)  # type: ignore[attr-defined, unused-ignore]
    return path


def build_tiny_nsfw_classifier(path: Path, *, flag_everything: bool) -> Path:
    """Write a tiny ViT image classifier (labels ``normal``/``nsfw``) to ``path``.

    The classifier head's weights are zeroed and its bias set, so the
    prediction does not depend on the image: ``nsfw`` with probability ~0.998
    when ``flag_everything``, else ``normal`` with the same confidence. That
    makes the flag plumbing testable with real model code.
    """
    path = Path(path)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=37,
        id2label=dict(NSFW_LABELS),
        label2id={label: i for i, label in NSFW_LABELS.items()},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = ViTForImageClassification(config)
    head = model.classifier
    assert isinstance(head, torch.nn.Linear)
    winner = 1 if flag_everything else 0
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[winner] = 6.0  # softmax: e^6 / (e^6 + 1) ~ 0.9975, whatever the image
    model.save_pretrained(path, safe_serialization=True)
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": 32, "width": 32},
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(path)
    return path
