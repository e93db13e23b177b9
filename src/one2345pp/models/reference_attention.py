"""Reference attention, the local condition of the multi-view stage (``shared/design/METHOD.md``, stage 1).

The clean condition latent is noised to the same timestep as the target (fresh noise) and run through the same UNet
in a *record* pass whose output is discarded: every self-attention layer (``attn1``) records its input tokens. In the
*read* pass over the target, each ``attn1`` appends its recorded tokens to its keys and values; queries come from the
target only, so the condition and the target may have different spatial sizes. Cross-attention layers (``attn2``)
are left as they are.

The pass is chosen per UNet call through ``cross_attention_kwargs={"reference": ReferencePass(...)}`` rather than by
mutable state on the processors, so gradient checkpointing (which re-runs a block's forward during backward with the
arguments of the original call) recomputes each pass in its own mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

__all__ = [
    "READ",
    "RECORD",
    "CrossAttnProcessor",
    "ReferenceAttnProcessor",
    "ReferencePass",
    "install_reference_attention",
    "noisy_reference",
    "reference_forward",
    "self_attention_names",
]

RECORD = "record"
READ = "read"


@dataclass
class ReferencePass:
    """One UNet call's role: ``record`` the ``attn1`` input tokens into ``tokens`` or ``read`` them from there.

    ``tokens`` maps processor names to recorded tokens ``[B, N_ref, C]``; ``reads`` lists the names that appended
    their tokens during a read pass (used to check that every recorded layer was read).
    """

    mode: str
    tokens: dict[str, torch.Tensor]
    reads: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in (RECORD, READ):
            raise ValueError(f"reference pass mode must be {RECORD!r} or {READ!r}, got {self.mode!r}")


class ReferenceAttnProcessor:
    """Self-attention (``attn1``) processor: records its input in a record pass, attends to it in a read pass.

    Without a ``reference`` argument it is plain self-attention. The attention itself is diffusers'
    ``AttnProcessor2_0`` (scaled dot-product attention); the read pass hands it ``[target tokens, reference tokens]``
    as the key/value context.
    """

    def __init__(self, name: str):
        self.name = name
        self._attend = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        reference: ReferencePass | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.name}: reference attention belongs on self-attention layers (attn1)")
        if reference is None:
            return self._attend(attn, hidden_states, None, attention_mask, temb)
        if hidden_states.ndim != 3:
            raise ValueError(f"{self.name}: expected tokens [B, N, C], got shape {tuple(hidden_states.shape)}")
        if reference.mode == RECORD:
            # setdefault: a recomputation under gradient checkpointing leaves the recorded tokens as they were
            reference.tokens.setdefault(self.name, hidden_states)
            return self._attend(attn, hidden_states, None, attention_mask, temb)
        recorded = reference.tokens.get(self.name)
        if recorded is None:
            raise RuntimeError(f"{self.name}: read pass without recorded reference tokens (run the record pass first)")
        if recorded.shape[0] != hidden_states.shape[0] or recorded.shape[2] != hidden_states.shape[2]:
            raise ValueError(
                f"{self.name}: reference tokens {tuple(recorded.shape)} do not match target tokens "
                f"{tuple(hidden_states.shape)} in batch size or channels"
            )
        reference.reads.append(self.name)
        context = torch.cat([hidden_states, recorded.to(hidden_states.dtype)], dim=1)
        return self._attend(attn, hidden_states, context, attention_mask, temb)


class CrossAttnProcessor(AttnProcessor2_0):
    """Processor for the layers that are not ``attn1``: plain attention that accepts and ignores ``reference``.

    Accepting the argument keeps diffusers from warning, at every call, that a cross-attention kwarg is unused.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, reference=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def self_attention_names(unet) -> list[str]:
    """Processor names of the UNet's self-attention layers (``...attn1.processor``)."""
    return [name for name in unet.attn_processors if name.endswith("attn1.processor")]


def install_reference_attention(unet) -> list[str]:
    """Give every ``attn1`` a :class:`ReferenceAttnProcessor` and every other attention a :class:`CrossAttnProcessor`.

    Returns the names of the reference processors. Idempotent.
    """
    names = self_attention_names(unet)
    if not names:
        raise ValueError("the UNet has no self-attention layers (attn1); reference attention needs transformer blocks")
    processors = {
        name: ReferenceAttnProcessor(name) if name.endswith("attn1.processor") else CrossAttnProcessor()
        for name in unet.attn_processors
    }
    unet.set_attn_processor(processors)
    return names


def noisy_reference(
    latents: torch.Tensor, timestep: torch.Tensor | float, noise: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The condition latent noised to ``timestep`` of the training schedule (DDPM form), whatever the sampler.

    ``timestep`` is a scalar or one value per batch item; fractional timesteps round to the nearest schedule step.
    """
    t = torch.as_tensor(timestep, device=latents.device).round().long().clamp(0, len(alphas_cumprod) - 1)
    if t.ndim == 0:
        t = t.expand(latents.shape[0])
    a = alphas_cumprod.to(device=latents.device, dtype=torch.float32)[t].view(-1, *([1] * (latents.ndim - 1)))
    return (a.sqrt() * latents.float() + (1.0 - a).sqrt() * noise.float()).to(latents.dtype)


def reference_forward(
    unet,
    sample: torch.Tensor,
    timestep: torch.Tensor | float,
    encoder_hidden_states: torch.Tensor,
    reference_latents: torch.Tensor,
    passes: tuple[ReferencePass, ReferencePass] | None = None,
) -> torch.Tensor:
    """Record pass over ``reference_latents`` (output discarded), then the read pass over ``sample``; returns the
    read pass's prediction. Both passes share ``timestep`` and ``encoder_hidden_states``.

    ``passes`` (a fresh record/read pair over one token dict) may be given to inspect what was recorded and read.
    """
    if reference_latents.shape[0] != sample.shape[0]:
        raise ValueError(
            f"reference batch {reference_latents.shape[0]} does not match the target batch {sample.shape[0]}"
        )
    if passes is None:
        tokens: dict[str, torch.Tensor] = {}
        passes = (ReferencePass(RECORD, tokens), ReferencePass(READ, tokens))
    record, read = passes
    unet(reference_latents, timestep, encoder_hidden_states, cross_attention_kwargs={"reference": record})
    out = unet(sample, timestep, encoder_hidden_states, cross_attention_kwargs={"reference": read}).sample
    unread = set(record.tokens) - set(read.reads)
    if not record.tokens or unread:
        raise RuntimeError(
            f"reference attention is not installed on this UNet or skipped layers: recorded {len(record.tokens)}, "
            f"unread {sorted(unread)[:3]} (call install_reference_attention)"
        )
    return out
