"""GALIP (Tao et al., CVPR 2023): a text-to-image GAN that generates and discriminates through a frozen CLIP.

Parts (top-level children, as ``python -m t2i_train.summary`` lists them):

- ``clip``: the frozen CLIP (one config node built by ``t2i_train.models.clip.load_frozen_clip``). Text: the sentence embedding
  ``e`` = the EOT feature through the text projection, *not* L2-normalised (as the authors' code feeds it;
  ``normalize_text=True`` normalises). Images in [-1, 1] are resized to CLIP's input size and
  CLIP-normalised (``FrozenCLIP.preprocess``); ``clip_double_rescale=True`` reproduces the official code,
  which maps [-1, 1] to [0, 1] twice (CLIP then sees [0.5, 1]).
- ``generator`` (the CLIP-empowered generator): ``cond = [z, e]``; ``z`` → linear → a ``code_channels`` map
  on CLIP's patch grid; the bridge-feature predictor (``MBlock`` s) → conv5×5 to CLIP's width; those bridge
  features run as patch tokens (with CLS and positions) through *all* frozen ViT blocks, one predicted prompt
  token appended before each of ``prompt_blocks`` and removed after it (gradients flow through the frozen
  blocks into the generator); conv5×5(bridge + 0.1·mapped) → the first ``GBlock``; ``GBlock`` s upsample
  (nearest) to the output size; LeakyReLU + conv3×3 → RGB without tanh (clamped only in ``generate``).
- ``discriminator`` (NetD, "Mate-D"): patch-token features (no CLS) of the frozen ViT blocks ``d_taps``,
  each [width, grid, grid]; from the first tap, ``DBlock`` s ``x + γ·convs(x) + β·(next tap)``, then a
  ``DBlock`` to ``d_channels``: ``shortcut(x) + γ·convs(x)``; γ, β start at 0, convs have no bias.
- ``netc`` (NetC): the sentence embedding tiled over the grid, concatenated, two convolutions (4×4 and 4×4
  at ViT-B/32's 7×7 grid; sized to collapse any grid to 1×1) → one score per image.

Paper COCO size (``experiment=galip_coco``): ngf 64, nz 100, ViT-B/32 (grid 7, width 768, e ∈ ℝ⁵¹²), taps
1/4/8, prompts into blocks 1..8, 224² output: G 51.83M, NetD 28.71M, NetC 2.10M trainable. The authors'
D-block builds its 1×1 shortcut convolution whatever the widths and uses it only when they differ; it is kept
(1.18M of NetD's count are those unused weights) so the counts match the reference.

The frozen CLIP trunk runs once per image set and step: ``forward`` returns the stacked tap features of the
real images (no graph) and of the generated ones (with graph, for the generator loss) plus the generated
images' global CLIP embedding; ``t2i_train.losses.gan_hinge_magp`` turns them into the D and G terms and
``t2i_train.gan_task.GANTask`` alternates the two optimizers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from t2i_train.errors import ConfigError
from t2i_train.losses.gan_hinge_magp import GanHingeMAGP
from t2i_train.models.base import Family
from t2i_train.models.stage1 import warn_random_stage1

if TYPE_CHECKING:
    from t2i_train.models.clip import FrozenCLIP

log = logging.getLogger(__name__)

#: Maps bridge features [B, width, g, g] and prompts [B, P, width] through the frozen ViT -> [B, width, g, g].
ClipMapper = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ generator
class Affine(nn.Module):
    """Text-conditioned affine ``γ(cond)·x + β(cond)``; γ and β are 2-layer MLPs starting at γ=1, β=0."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.beta = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        nn.init.zeros_(self.gamma[2].weight)
        nn.init.ones_(self.gamma[2].bias)
        nn.init.zeros_(self.beta[2].weight)
        nn.init.zeros_(self.beta[2].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.gamma(cond)[:, :, None, None] * x + self.beta(cond)[:, :, None, None]


class Fusion(nn.Module):
    """Two text-conditioned affine layers, each followed by LeakyReLU(0.2)."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.affine1 = Affine(cond_dim, channels)
        self.affine2 = Affine(cond_dim, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.affine1(x, cond), 0.2)
        return F.leaky_relu(self.affine2(x, cond), 0.2)


class MBlock(nn.Module):
    """Bridge-feature predictor block: ``x + fusion(conv(fusion(conv(x))))`` at a fixed resolution."""

    def __init__(self, channels: int, mid_channels: int, cond_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, mid_channels, 3, 1, 1)
        self.fuse1 = Fusion(cond_dim, mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, channels, 3, 1, 1)
        self.fuse2 = Fusion(cond_dim, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.fuse1(self.conv1(x), cond)
        return x + self.fuse2(self.conv2(h), cond)


class GBlock(nn.Module):
    """Nearest upsampling to ``size``, then ``shortcut(x) + conv(fusion(conv(fusion(x))))``."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.fuse1 = Fusion(cond_dim, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.fuse2 = Fusion(cond_dim, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.size, self.size), mode="nearest")
        h = self.conv2(self.fuse2(self.conv1(self.fuse1(x, cond)), cond))
        return self.shortcut(x) + h


def generator_plan(ngf: int, image_size: int) -> tuple[list[int], list[int]]:
    """Channels before/after each G-block and the sizes they upsample to.

    ``n = ceil(log2(image_size)) - 2`` blocks; widths ``ngf·min(2^i, 8)`` from the deepest down; sizes double
    from 8, the last being ``image_size`` (224: 512→512×3, 256, 128, 64 at 8, 16, 32, 64, 128, 224).
    """
    n = max(1, math.ceil(math.log2(image_size)) - 2)
    channels = [ngf * min(2**i, 8) for i in range(n + 1)][::-1]
    sizes = [2 ** (i + 3) for i in range(n - 1)] + [image_size]
    return channels, sizes


class Generator(nn.Module):
    """GALIP's CLIP-empowered generator ``G(z, e)`` -> images [B, 3, S, S] (unbounded; ~[-1, 1] once trained).

    ``forward`` needs the frozen ViT as a callable (``clip_map``) so the CLIP stays outside this module's
    parameters (it is not trained, not saved twice, not sharded with the generator).
    """

    def __init__(
        self,
        nz: int,
        text_dim: int,
        clip_width: int,
        grid: int,
        image_size: int,
        ngf: int = 64,
        code_channels: int = 64,
        mid_channels: int = 32,
        num_mblocks: int = 4,
        num_prompts: int = 8,
        map_weight: float = 0.1,
    ) -> None:
        super().__init__()
        cond_dim = nz + text_dim
        channels, sizes = generator_plan(ngf, image_size)
        self.nz, self.grid, self.clip_width, self.num_prompts = nz, grid, clip_width, num_prompts
        self.code_channels, self.map_weight = code_channels, map_weight
        self.fc_code = nn.Linear(nz, code_channels * grid * grid)
        self.mblocks = nn.ModuleList(
            MBlock(code_channels, mid_channels, cond_dim) for _ in range(num_mblocks)
        )
        self.to_bridge = nn.Conv2d(code_channels, clip_width, 5, 1, 2)
        self.fc_prompt = nn.Linear(cond_dim, num_prompts * clip_width)
        self.from_clip = nn.Conv2d(clip_width, channels[0], 5, 1, 2)
        self.gblocks = nn.ModuleList(
            GBlock(c_in, c_out, cond_dim, size)
            for c_in, c_out, size in zip(channels[:-1], channels[1:], sizes, strict=True)
        )
        self.to_rgb = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(channels[-1], 3, 3, 1, 1))

    def bridge_features(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """[B, clip_width, grid, grid]: what the frozen ViT receives as patch tokens."""
        x = self.fc_code(z).view(z.shape[0], self.code_channels, self.grid, self.grid)
        for block in self.mblocks:
            x = block(x, cond)
        return self.to_bridge(x)

    def prompts(self, cond: torch.Tensor) -> torch.Tensor:
        return self.fc_prompt(cond).view(cond.shape[0], self.num_prompts, self.clip_width)

    def forward(self, z: torch.Tensor, text_emb: torch.Tensor, clip_map: ClipMapper) -> torch.Tensor:
        cond = torch.cat([z, text_emb.to(z.dtype)], dim=1)
        bridge = self.bridge_features(z, cond)
        mapped = clip_map(bridge, self.prompts(cond)).to(bridge.dtype)
        x = self.from_clip(bridge + self.map_weight * mapped)
        for block in self.gblocks:
            x = block(x, cond)
        return self.to_rgb(x)


# -------------------------------------------------------------------------------------- discriminator
class DBlock(nn.Module):
    """``shortcut(x) + γ·convs(x) [+ β·clip_feature]``, γ and β starting at 0, convolutions without bias.

    The 1×1 shortcut is built whatever the widths (as in the authors' code, whose parameter count includes
    it) and applied only when they differ.
    """

    def __init__(self, in_channels: int, out_channels: int, clip_feature: bool) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.LeakyReLU(0.2),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.learned_shortcut = in_channels != out_channels
        self.gamma = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1)) if clip_feature else None

    def forward(self, x: torch.Tensor, clip_feature: torch.Tensor | None = None) -> torch.Tensor:
        out = (self.shortcut(x) if self.learned_shortcut else x) + self.gamma * self.convs(x)
        if self.beta is not None:
            if clip_feature is None:
                raise ValueError("this D-block mixes in a CLIP feature map; pass clip_feature")
            out = out + self.beta * clip_feature
        return out


class Discriminator(nn.Module):
    """NetD: CLIP tap features [B, T, width, g, g] -> [B, out_channels, g, g]."""

    def __init__(self, width: int, num_taps: int, out_channels: int = 512) -> None:
        super().__init__()
        if num_taps < 1:
            raise ConfigError("model.d_taps needs at least one CLIP block")
        self.blocks = nn.ModuleList(DBlock(width, width, clip_feature=True) for _ in range(num_taps - 1))
        self.main = DBlock(width, out_channels, clip_feature=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features[:, 0]
        for i, block in enumerate(self.blocks):
            x = block(x, features[:, i + 1])
        return self.main(x)


def netc_kernels(grid: int) -> tuple[int, int]:
    """Two valid convolutions that take a ``grid``² map to 1×1 (4 and 4 for ViT-B/32's 7×7)."""
    first = grid // 2 + 1
    return first, grid - first + 1


class NetC(nn.Module):
    """Tiles the sentence embedding over the grid, concatenates, conv-LeakyReLU-conv -> one score per image."""

    def __init__(self, in_channels: int, text_dim: int, grid: int, hidden: int = 128) -> None:
        super().__init__()
        k1, k2 = netc_kernels(grid)
        self.grid = grid
        self.net = nn.Sequential(
            nn.Conv2d(in_channels + text_dim, hidden, k1, 1, 0, bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, 1, k2, 1, 0, bias=False),
        )

    def forward(self, h: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        tiled = text_emb.to(h.dtype)[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
        return self.net(torch.cat([h, tiled], dim=1)).flatten()


# ------------------------------------------------------------------------------------------------ family
class GALIP(Family):
    """GALIP with its frozen CLIP.

    Args:
        clip: the frozen CLIP: a ``FrozenCLIP`` (what the config node ``clip: {_target_:
            t2i_train.models.clip.load_frozen_clip, ...}`` builds) or that node's arguments as a mapping (None:
            the tiny random CLIP). Its ``checkpoint`` is a ``model=clip`` training checkpoint or export folder
            (the tiny CLIP trained here) whose weights replace the CLIP described by ``model_name`` /
            ``config``; ``model_name`` + ``pretrained``: an open_clip architecture (``ViT-B-32``) and weights
            tag (``openai``); ``config``: a ``{embed_dim, vision_cfg, text_cfg}`` dict instead (null with no
            name: the tiny CLIP of ``t2i_train.models.clip``); ``context_length``: text tokens (dict configs
            only). No checkpoint and no tag: random weights from ``init_seed`` (a loud warning at the first
            step; only for smoke tests).
        image_size: output side in pixels (224 in the paper, 32 tiny).
        nz: noise dimension; ngf: generator base width; code_channels / mid_channels / num_mblocks: the
            bridge-feature predictor (64 / 32 / 4 in the paper).
        prompt_blocks: ViT blocks (0-indexed) that get one predicted prompt token each (1..8 in the paper).
        d_taps: ViT blocks whose patch tokens the discriminator reads (1, 4, 8 in the paper).
        d_channels: NetD output width (512); netc_hidden: NetC hidden width (128).
        map_weight: weight of the CLIP-mapped features added to the bridge features (0.1).
        normalize_text: L2-normalise the sentence embedding (the authors do not).
        clip_double_rescale: reproduce the official code's double [-1,1]→[0,1] rescaling of CLIP inputs.
    """

    family_name: ClassVar[str] = "galip"
    accepted_losses: ClassVar[tuple[type[nn.Module], ...]] = (GanHingeMAGP,)
    task_class: ClassVar[str] = "t2i_train.gan_task.GANTask"
    block_classes: ClassVar[tuple[type[nn.Module], ...]] = (GBlock, MBlock, DBlock)
    external_paths: ClassVar[tuple[str, ...]] = ("clip.checkpoint",)

    def __init__(
        self,
        clip: FrozenCLIP | Mapping[str, Any] | None = None,
        image_size: int = 32,
        nz: int = 16,
        ngf: int = 8,
        code_channels: int = 32,
        mid_channels: int = 16,
        num_mblocks: int = 2,
        prompt_blocks: Sequence[int] = (1, 2),
        d_taps: Sequence[int] = (0, 1, 2),
        d_channels: int = 64,
        netc_hidden: int = 32,
        map_weight: float = 0.1,
        normalize_text: bool = False,
        clip_double_rescale: bool = False,
    ) -> None:
        super().__init__()
        from t2i_train.models.clip import frozen_clip  # the CLIP family module (open_clip)

        self.clip = frozen_clip(clip)
        #: the CLIP's weights come from a stage-1 checkpoint or a pretrained tag (not from this run)
        self.clip_has_weights = self.clip.has_weights
        self.freeze("clip", external=self.clip_has_weights)
        self.normalize_text = normalize_text
        self.clip_double_rescale = clip_double_rescale
        self.image_size, self.nz = image_size, nz
        visual = self.clip.model.visual
        depth = len(visual.transformer.resblocks)
        self.d_taps = _check_blocks("d_taps", d_taps, depth)
        self.prompt_blocks = _check_blocks("prompt_blocks", prompt_blocks, depth)
        self.grid = int(visual.grid_size[0])
        width, text_dim = self.clip.width, self.clip.embed_dim
        self.generator = Generator(
            nz,
            text_dim,
            width,
            self.grid,
            image_size,
            ngf,
            code_channels,
            mid_channels,
            num_mblocks,
            len(self.prompt_blocks),
            map_weight,
        )
        self.discriminator = Discriminator(width, len(self.d_taps), d_channels)
        self.netc = NetC(d_channels, text_dim, self.grid, netc_hidden)

    # ------------------------------------------------------------------------------------ optimizer split
    def generator_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.generator.parameters() if p.requires_grad)

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """NetD and NetC: one optimizer, as in the paper."""
        for module in (self.discriminator, self.netc):
            yield from (p for p in module.parameters() if p.requires_grad)

    # ------------------------------------------------------------------------------------ frozen CLIP
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings e [B, embed_dim] (float32; unnormalised unless ``normalize_text``)."""
        tokens = self.clip.tokenize(list(prompts))
        return self.clip.model.encode_text(tokens, normalize=self.normalize_text).float()

    def _clip_input(self, images: torch.Tensor) -> torch.Tensor:
        if self.clip_double_rescale:  # official code: CLIP sees ((x+1)/2 + 1)/2 before mean/std
            images = (images + 1.0) / 2.0
        return self.clip.preprocess(images)

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One frozen ViT block on batch-first tokens [B, L, width]."""
        if getattr(self.clip.model.visual.transformer, "batch_first", True):
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)

    def _start_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, width] -> [CLS, patches] + positions, through ``ln_pre``."""
        visual = self.clip.model.visual
        cls = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)
        return visual.ln_pre(x)

    def _to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens without CLS [B, g², width] -> [B, width, g, g]."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.grid, self.grid)

    def clip_map(self, bridge: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Bridge features [B, width, g, g] as patch tokens through every frozen ViT block; prompt token i is
        appended before block ``prompt_blocks[i]`` and dropped after it. Returns [B, width, g, g]."""
        dtype = self.clip.model.visual.conv1.weight.dtype
        x = self._start_tokens(bridge.flatten(2).transpose(1, 2).to(dtype))
        prompts = prompts.to(x.dtype)
        slot = {block: i for i, block in enumerate(self.prompt_blocks)}
        for i, block in enumerate(self.clip.model.visual.transformer.resblocks):
            if i in slot:
                x = self._run_block(block, torch.cat([x, prompts[:, slot[i], None]], dim=1))[:, :-1]
            else:
                x = self._run_block(block, x)
        return self._to_grid(x[:, 1:])

    def clip_image_features(
        self, images: torch.Tensor, with_embedding: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images [B,3,H,W] in [-1, 1] -> (tap features [B, T, width, g, g], global embedding [B, D] or None).

        The embedding is CLIP's unnormalised image embedding (``ln_post`` of CLS through the projection);
        without it the trunk stops after the last tapped block. Differentiable w.r.t. the images.
        """
        visual = self.clip.model.visual
        patches = visual.conv1(self._clip_input(images)).flatten(2).transpose(1, 2)
        x = self._start_tokens(patches)
        blocks = visual.transformer.resblocks
        last = len(blocks) - 1 if with_embedding else max(self.d_taps)
        taps = []
        for i in range(last + 1):
            x = self._run_block(blocks[i], x)
            if i in self.d_taps:
                taps.append(self._to_grid(x[:, 1:]))
        features = torch.stack(taps, dim=1)
        if not with_embedding:
            return features, None
        pooled, _ = visual._pool(x)  # open_clip's own pooling (ln_post + CLS for CLIP ViTs)
        embedding = pooled @ visual.proj if visual.proj is not None else pooled
        return features, embedding

    # ------------------------------------------------------------------------------------------ training
    def discriminate(self, features: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """D(C(x), e): one score per image from CLIP tap features and sentence embeddings."""
        return self.netc(self.discriminator(features), text_emb)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What ``GanHingeMAGP`` needs, the frozen trunk run once per image set:

        ``image`` (real, [-1, 1]), ``text_emb`` e [B, D], ``fake`` G(z, e), ``real_features`` (no graph) and
        ``fake_features`` (graph to G) [B, T, width, g, g], ``fake_emb`` CLIP_img(G(z, e)) [B, D].
        """
        self._warn_if_random_clip()
        images = batch["image"]
        text_emb = self.encode_text(batch["caption"]).to(images.device)
        z = torch.randn(images.shape[0], self.nz, device=images.device)
        fake = self.generator(z, text_emb, self.clip_map)
        with torch.no_grad():
            real_features, _ = self.clip_image_features(images, with_embedding=False)
        fake_features, fake_emb = self.clip_image_features(fake)
        return {
            "image": images,
            "text_emb": text_emb,
            "fake": fake,
            "real_features": real_features,
            "fake_features": fake_features,
            "fake_emb": fake_emb,
        }

    def _warn_if_random_clip(self) -> None:
        if self.training and not self.clip_has_weights:
            warn_random_stage1(
                self,
                "clip",
                "GALIP IS TRAINING THROUGH A RANDOMLY INITIALISED CLIP: set model.clip.checkpoint=<clip .ckpt> "
                "(train one with model=clip) or model.clip.model_name=ViT-B-32 model.clip.pretrained=openai "
                "model.clip.config=null; text conditioning and the CLIP alignment term mean little",
            )

    @classmethod
    def upgrade_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Configs from before the CLIP was one node (flat ``clip_*`` keys) read as today's."""
        from t2i_train.models.clip import nest_clip_keys

        return nest_clip_keys(super().upgrade_config(config))

    def clip_scorer(self) -> FrozenCLIP:
        """The frozen CLIP it trains through, as the CLIP score's scorer (capability ``clip_scorer``)."""
        return self.clip

    # ------------------------------------------------------------------------------------------ sampling
    def _noise(self, n: int, seed: int | None, generator: torch.Generator | None) -> torch.Tensor:
        device = self.netc.net[0].weight.device
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(n, self.nz, device=device, generator=generator)

    def _images(self, z: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        images = self.generator(z, text_emb.to(z.device), self.clip_map)
        return (images.float().clamp(-1.0, 1.0) + 1.0) / 2.0

    @torch.no_grad()
    def generate(
        self, prompts: list[str], seed: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One forward pass ``G(z, e)`` with ``z ~ N(0, I)`` (from ``seed`` or ``generator``) -> [B,3,H,W] in
        [0, 1]. No guidance: GALIP is trained without condition dropout."""
        return self._images(self._noise(len(prompts), seed, generator), self.encode_text(prompts))

    @torch.no_grad()
    def interpolate(
        self,
        prompts_a: str | Sequence[str],
        prompts_b: str | Sequence[str] | None = None,
        mode: str = "z",
        steps: int = 8,
        seed: int = 0,
        spherical: bool = False,
    ) -> torch.Tensor:
        """An interpolation strip [steps, 3, H, W] in [0, 1].

        ``mode="z"``: text ``prompts_a`` fixed, z from z₀ to z₁ (two successive one-row draws from ``seed``,
        as two ``generate([prompt], generator=g)`` calls would take them; lerp, or slerp with ``spherical``).
        ``mode="text"``: z₀ fixed, e from e(``prompts_a``) to e(``prompts_b``). The first image equals
        ``generate([prompts_a], seed=seed)``; in text mode the last equals ``generate([prompts_b], seed=seed)``.
        """
        if steps < 2:
            raise ValueError(f"an interpolation strip needs steps >= 2, got {steps}")
        generator = torch.Generator(device=self.netc.net[0].weight.device).manual_seed(seed)
        z0, z1 = self._noise(1, None, generator), self._noise(1, None, generator)
        t = torch.linspace(0.0, 1.0, steps, device=z0.device)[:, None]
        e_a = self.encode_text(_one_prompt(prompts_a))
        if mode == "z":
            z = _slerp(z0, z1, t) if spherical else torch.lerp(z0, z1, t)
            return self._images(z, e_a.expand(steps, -1))
        if mode == "text":
            if prompts_b is None:
                raise ValueError("mode='text' interpolates between two prompts: pass prompts_b")
            e_b = self.encode_text(_one_prompt(prompts_b))
            return self._images(z0.expand(steps, -1), torch.lerp(e_a.to(t.device), e_b.to(t.device), t))
        raise ValueError(f"mode must be 'z' or 'text', got {mode!r}")


def _one_prompt(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != 1:
        raise ValueError(f"an interpolation strip takes one prompt per end, got {len(prompts)}")
    return prompts


def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of the rows a [1, n] and b [1, n] at fractions t [S, 1] -> [S, n]."""
    cos = F.cosine_similarity(a, b).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    if float(omega) < 1e-6:
        return torch.lerp(a, b, t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def _check_blocks(name: str, blocks: Sequence[int], depth: int) -> tuple[int, ...]:
    values = tuple(int(b) for b in blocks)
    if not values or any(b < 0 or b >= depth for b in values) or len(set(values)) != len(values):
        raise ConfigError(
            f"model.{name}={list(values)}: give distinct ViT block indices in [0, {depth - 1}] "
            f"(the frozen CLIP has {depth} blocks)"
        )
    if list(values) != sorted(values):
        raise ConfigError(f"model.{name}={list(values)} must be in increasing order")
    return values
