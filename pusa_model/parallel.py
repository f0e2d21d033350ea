"""One request on several GPUs of a node: Ulysses sequence parallelism and CFG parallelism for the DiT.

Ranks form a device mesh ``("cfg", "ring", "ulysses")`` of shape ``(cfg, 1, U)`` over the default process
group (G = cfg·U processes, one per GPU): ranks ``0..U-1`` run the conditional pass, ``U..2U-1`` the
unconditional one, and each row of U ranks splits one pass by sequence.

Sequence parallelism (Ulysses). Tokens are frame-major (``F`` frames of ``T = H/2 · W/2`` tokens). Every
rank keeps the same slice of every frame: tokens ``[t0, t1)`` of each of the F frames, the T tokens of a
frame split as evenly as ``tensor_split`` does (shares differ by at most one token, for any F, T and U).
So a rank's sequence is still ``(B, F, T_r, D)`` frame-major and the per-frame modulation ``(B, F, 6, D)``
(replicated, a few KB) broadcasts over it unchanged: `block_forward` runs as it is. RoPE is sliced with the
same indices. Inside each self-attention diffusers' own Ulysses attention (the context-parallel path of its
attention dispatcher) all-to-alls q, k, v from (own tokens, all heads) to (all tokens, H/U heads), attends,
and all-to-alls back; attention has no mask, so the rank-major key order it sees changes nothing but float
summation order. When ``T % U != 0`` its "Ulysses anything" variant does the uneven all-to-all
(``all_to_all_single`` with split sizes). Cross-attention to the text needs no communication (diffusers'
Wan processor passes no parallel config there). The output head runs on each rank's share and one
all-gather reassembles ``(B, C, F, H, W)`` on every rank.

diffusers' model-level plan (``WanTransformer3DModel._cp_plan`` through ``enable_parallelism``) is not
used: it shards the stock ``forward``'s per-token timestep and hooks ``blocks.0.forward``, which the
per-frame path never calls, and splits the flat sequence, cutting frames. Only the attention-level part is
used, by setting the self-attention processors' ``_parallel_config`` (what ``enable_parallelism`` does).

CFG parallelism. The two cfg rows compute the conditional and the unconditional velocity at the same
time; one all-gather over the cfg group gives both to every rank, which combine them exactly as
`guided_velocity` does, so the step is the same arithmetic as the single-process one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .dit import DiTStage
from .lora import LoraFuser
from .sampler import VelocityModel
from .transformer import BlockFn, DiTOptions, block_forward, forward_per_frame

MESH_DIMS = ("cfg", "ring", "ulysses")


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    """The ``(cfg, 1, ulysses)`` mesh of this process and its groups."""

    mesh: DeviceMesh
    cfg: int
    ulysses: int

    @property
    def cfg_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("cfg")

    @property
    def ulysses_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ulysses")

    @property
    def cfg_rank(self) -> int:
        """0: this rank computes the conditional pass; 1: the unconditional one."""
        return self.mesh.get_local_rank("cfg")


def init_parallel_groups(cfg: int = 1, ulysses: int = 1, device_type: str | None = None) -> ParallelGroups:
    """Build the mesh over the initialised default process group, whose size must be ``cfg * ulysses``.

    Collective: every rank calls it. `device_type` defaults to ``"cuda"`` when CUDA is available.
    """
    if cfg not in (1, 2):
        raise ValueError(f"cfg parallel degree must be 1 or 2, got {cfg}")
    if ulysses < 1 or cfg * ulysses != dist.get_world_size():
        raise ValueError(f"cfg {cfg} x ulysses {ulysses} != world size {dist.get_world_size()}")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device_type, (cfg, 1, ulysses), mesh_dim_names=MESH_DIMS)
    return ParallelGroups(mesh, cfg, ulysses)


def frame_token_shares(tokens_per_frame: int, world: int) -> list[int]:
    """How many of each frame's tokens every rank keeps: ``tensor_split``'s sizes (first ranks +1)."""
    if tokens_per_frame < world:
        raise ValueError(f"{tokens_per_frame} tokens per frame cannot be split over {world} ranks")
    base, extra = divmod(tokens_per_frame, world)
    return [base + (rank < extra) for rank in range(world)]


class UlyssesTokens:
    """`transformer.TokenSplit` of Ulysses: this rank keeps the same slice of every frame's tokens."""

    def __init__(self, group: dist.ProcessGroup, tokens_per_frame: int) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.shares = frame_token_shares(tokens_per_frame, dist.get_world_size(group))
        self.start = sum(self.shares[: self.rank])

    def split(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, F*T, ...) -> (B, F*T_rank, ...): tokens ``[start, start + T_rank)`` of every frame."""
        per_frame = tokens.unflatten(1, (frames, -1))
        return per_frame.narrow(2, self.start, self.shares[self.rank]).flatten(1, 2).contiguous()

    def gather(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, F*T_rank, C) on every rank -> (B, F*T, C) on every rank (one padded all-gather)."""
        local = tokens.unflatten(1, (frames, -1))
        longest = max(self.shares)
        padded = torch.nn.functional.pad(local, (0, 0, 0, longest - local.shape[2])).contiguous()
        parts = [torch.empty_like(padded) for _ in self.shares]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:, :, :n] for part, n in zip(parts, self.shares)], dim=2).flatten(1, 2)


class SequenceParallel:
    """Ulysses sequence parallelism of `forward_per_frame` for `model` over `groups`' ulysses ranks.

    Every rank of a ulysses group calls it with the same full inputs and gets the same full output.
    Needs the heads divisible by U (40 heads: U in 2, 4, 5, 8) and an attention backend that supports
    diffusers' context parallelism (``native``, ``_native_cudnn``, ``_native_flash``, ``flash``, ...):
    set the backend (`transformer.apply_options`) before building this.
    """

    def __init__(self, model: WanTransformer3DModel, groups: ParallelGroups) -> None:
        degree = groups.ulysses
        heads = model.config.num_attention_heads
        if degree < 2:
            raise ValueError("sequence parallelism needs ulysses >= 2")
        if heads % degree:
            raise ValueError(f"{heads} attention heads cannot be split over {degree} ranks")
        self.model = model
        self.group = groups.ulysses_group
        self._processors = [block.attn1.processor for block in model.blocks]
        for processor in self._processors:
            _check_backend(processor)
        # What `ModelMixin.enable_parallelism` builds, without its device lookup (which divides by the
        # accelerator count, zero on a CPU) and without the model-level hooks (see the module docstring).
        cp = ContextParallelConfig(ulysses_degree=degree, mesh=groups.mesh)
        device = model.patch_embedding.weight.device
        self._even = ParallelConfig(context_parallel_config=cp)
        self._even.setup(dist.get_rank(), dist.get_world_size(), device, mesh=groups.mesh)
        # Same mesh and groups; the "anything" all-to-all takes uneven sequence shares.
        self._uneven = dataclasses.replace(
            self._even, context_parallel_config=dataclasses.replace(cp, ulysses_anything=True)
        )

    @contextmanager
    def _attention(self, config: ParallelConfig) -> Iterator[None]:
        """Self-attention runs Ulysses under `config` for the duration (the model stays usable alone)."""
        for processor in self._processors:
            processor._parallel_config = config
        try:
            yield
        finally:
            for processor in self._processors:
                processor._parallel_config = None

    def __call__(
        self,
        hidden_states: torch.Tensor,
        frame_timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        block_fn: BlockFn = block_forward,
    ) -> torch.Tensor:
        """`forward_per_frame` of the whole input, computed by the ulysses group together."""
        _, p_h, p_w = self.model.config.patch_size
        tokens_per_frame = (hidden_states.shape[3] // p_h) * (hidden_states.shape[4] // p_w)
        tokens = UlyssesTokens(self.group, tokens_per_frame)
        config = self._even if len(set(tokens.shares)) == 1 else self._uneven
        with self._attention(config):
            return forward_per_frame(
                self.model, hidden_states, frame_timesteps, encoder_hidden_states, block_fn, tokens
            )


def _check_backend(processor) -> None:
    name = getattr(processor, "_attention_backend", None) or _AttentionBackendRegistry.get_active_backend()[0]
    backend = AttentionBackendName(name)
    if not _AttentionBackendRegistry._is_context_parallel_available(backend):
        raise ValueError(f"attention backend {backend.value!r} does not support sequence parallelism")


def cfg_parallel_velocity(
    model: VelocityModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    guidance: float,
    cfg_group: dist.ProcessGroup,
) -> torch.Tensor:
    """`sampler.guided_velocity` with the two passes on the two ranks of `cfg_group` (rank 0: cond).

    At guidance 1.0 (or without a negative prompt) both ranks run the conditional pass alone.
    """
    if guidance == 1.0 or negative_embeds is None:
        return model(latents, timesteps, prompt_embeds)
    mine = prompt_embeds if dist.get_rank(cfg_group) == 0 else negative_embeds
    out = model(latents, timesteps, mine).contiguous()
    velocity, uncond = (torch.empty_like(out) for _ in range(2))
    dist.all_gather([velocity, uncond], out, group=cfg_group)
    return uncond + guidance * (velocity - uncond)


class ParallelDiTStage(DiTStage):
    """`DiTStage` on the G = cfg·U ranks of `groups`: every rank builds one and calls `step` together
    with the same arguments (SPMD); every rank returns the same latents."""

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        groups: ParallelGroups,
        lora: LoraFuser | None = None,
        options: DiTOptions | None = None,
    ) -> None:
        super().__init__(transformer, lora, options)
        self.groups = groups
        self._sp = SequenceParallel(transformer, groups) if groups.ulysses > 1 else None
        if groups.cfg > 1:
            self.guide = functools.partial(cfg_parallel_velocity, cfg_group=groups.cfg_group)

    def velocity(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self._sp is None:
            return super().velocity(latents, timesteps, text)
        x = latents.to(self.device, self.dtype)
        text = text.to(self.device, self.dtype)
        return self._sp(x, timesteps.to(self.device), text, self._block_fn).float()
