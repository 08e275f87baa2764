"""LLaVA: CLIP vision tower -> projector -> LLaMA decoder, with the image features spliced into the text.

input_ids carry ONE `config.image_token_id` per image; each becomes Np = `config.num_image_tokens` embeddings
(576 for ViT-L/14-336), so a sequence of T ids with n images is T - n + n*Np long inside the LLM.
Positions count the image tokens. pixel_values (N, 3, S, S) holds the images in reading order: first
sequence's images first, each sequence's from left to right. An AnyRes model (LLaVA-1.6, minillava/anyres.py)
takes several tower inputs per image (the base image and its tiles, consecutive in pixel_values) and
image_sizes, the (h, w) of each image, from which it knows how many tiles and LLM positions each one has.
Generation with a KV cache: minillava/engine.py.
"""
import torch
import torch.nn as nn

from minillava.kernels.cross_entropy import cross_entropy
from minillava.clip import CLIPVisionTower
from minillava.config import LlavaConfig
from minillava.llama import LlamaForCausalLM, RMSNorm
from minillava.projector import Projector
from minillava.templates import IGNORE_INDEX  # the label of positions without a loss, defined once



class Llava(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision)
        self.multi_modal_projector = Projector(config.projector_type, config.vision.hidden_size,
                                               config.text.hidden_size)
        self.language_model = LlamaForCausalLM(config.text)
        if config.anyres:  # the learned vector that ends each row of an image's tile grid
            self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        """The initialisation HF's LLaMA and CLIP start pretraining from, drawn from a generator seeded with `seed`
        (the same seed, the same model): N(0, std) linears and embeddings, zero biases, unit norms, and CLIP's
        depth-scaled attention and MLP weights. Built on the meta device (to load a checkpoint into), nothing is
        drawn."""
        if any(p.is_meta for p in self.parameters()):
            return
        g = torch.Generator().manual_seed(seed)
        normal = lambda t, s: t.copy_(torch.randn(t.shape, generator=g) * s)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                normal(m.weight, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        vcfg = self.config.vision
        C, L = vcfg.hidden_size, vcfg.num_hidden_layers
        emb = self.vision_tower.vision_model.embeddings
        normal(emb.class_embedding, C ** -0.5)
        normal(emb.patch_embedding.weight, std)
        for layer in self.vision_tower.vision_model.encoder.layers:  # CLIP's depth-scaled init
            a = layer.self_attn
            for lin, s in ((a.q_proj, (2 * L * C) ** -0.5), (a.k_proj, (2 * L * C) ** -0.5),
                           (a.v_proj, (2 * L * C) ** -0.5), (a.out_proj, C ** -0.5),
                           (layer.mlp.fc1, (2 * C) ** -0.5), (layer.mlp.fc2, (2 * L * C) ** -0.5)):
                normal(lin.weight, s)
        for m in self.language_model.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        if self.config.anyres:
            normal(self.image_newline, self.config.text.hidden_size ** -0.5)
        self.language_model.tie_weights()

    @torch.no_grad()
    def use_anyres(self, pinpoints=None, seed: int = 0):
        """Turn a LLaVA-1.5 model into a 1.6 one to train (the original's --image_aspect_ratio anyres
        --mm_patch_merge_type spatial_unpad): AnyRes images on `pinpoints` (default: 1.6's grids of 1x2, 2x1,
        2x2, 3x1 and 1x3 tiles of this tower's size) and a fresh image_newline ~ N(0, 1/C), as the original's."""
        from minillava.config import PINPOINTS_1_6
        S, C = self.config.vision.image_size, self.config.text.hidden_size
        pinpoints = pinpoints or tuple((h // 336 * S, w // 336 * S) for h, w in PINPOINTS_1_6)
        self.config = self.config.replace(image_aspect_ratio="anyres", image_grid_pinpoints=tuple(pinpoints))
        w = self.language_model.model.embed_tokens.weight
        g = torch.Generator().manual_seed(seed)
        self.image_newline = nn.Parameter((torch.randn(C, generator=g) * C ** -0.5).to(w.device, w.dtype))

    def _sizes(self, image_sizes) -> list:
        """image_sizes (a list of (h, w) or an (N, 2) tensor) as [(h, w)] of ints; an AnyRes model needs them."""
        if image_sizes is None:
            raise ValueError("an AnyRes (LLaVA-1.6) model needs image_sizes, the (h, w) of each image")
        return [(int(h), int(w)) for h, w in image_sizes]

    def encode_images(self, pixel_values, image_sizes=None) -> list:
        """(N_tiles, 3, S, S) -> each image's projected features, [(n_k, C)]: n_k = Np, or with AnyRes the
        merged grid of image k of size image_sizes[k] = (h, w) (all tiles go through the tower in one batch)."""
        cfg = self.config
        S = cfg.vision.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"pixel_values have shape {tuple(pixel_values.shape)}, but this model's vision tower "
                             f"takes (N, 3, {S}, {S}) (size={S}): use minillava.image.model_pixels(image, "
                             "model.config)")
        tiles = [1] * pixel_values.shape[0]
        if cfg.anyres:
            image_sizes = self._sizes(image_sizes)
            tiles = [cfg.image_tiles(size) for size in image_sizes]
            if sum(tiles) != pixel_values.shape[0]:
                raise ValueError(f"image_sizes {image_sizes} need {sum(tiles)} tiles "
                                 f"({tiles}) but pixel_values holds {pixel_values.shape[0]}")
        feats = self.vision_tower(pixel_values, cfg.vision_feature_layer)  # (N_tiles, Np + 1, Cv)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop CLS: (N_tiles, Np, Cv)
        feats = self.multi_modal_projector(feats)  # (N_tiles, Np, C)
        if not cfg.anyres:
            return list(feats)
        from minillava.anyres import merge_features
        return [merge_features(f, size, cfg.image_grid_pinpoints, S, cfg.unpad_rounding, self.image_newline)
                for f, size in zip(feats.split(tiles), image_sizes)]

    def embed_inputs(self, input_ids, pixel_values=None, attention_mask=None, labels=None, image_sizes=None,
                     image_features=None):
        """Embed the text and splice in the image features.

        input_ids (B, T); attention_mask (B, T), 1 = real token; labels (B, T) or None; image_sizes (N, 2) or None;
        image_features: encode_images(pixel_values, image_sizes) when the caller ran it already (the engine times and
        caches it: pixel_values may then be None).
        A batch without image tokens given image_features (train.py's zero image, as the original gives a text-only
        sample) adds 0 x them to its embeddings: unchanged numbers, but the image path is in the graph.
        Returns inputs_embeds (B, L, C), attention_mask (B, L) bool, position_ids (B, L), labels (B, L) or None.
        Sequences that come out shorter than L are padded on the side the input was padded on (left when some
        row of attention_mask starts with padding, else right)."""
        B, T = input_ids.shape
        is_img = input_ids == self.config.image_token_id  # (B, T)
        n_img = int(is_img.sum())
        n_pix = 0 if pixel_values is None else pixel_values.shape[0]
        if self.config.anyres and pixel_values is not None:
            n_pix = len(self._sizes(image_sizes))  # several tiles per image
        if pixel_values is None and image_features is not None and n_img:  # encoded by the caller (the engine)
            n_pix = len(image_features)
        if n_img != n_pix:
            raise ValueError(f"input_ids hold {n_img} image tokens (id {self.config.image_token_id}) but "
                             f"{n_pix} images were given")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        embed = self.language_model.model.embed_tokens
        text = embed(input_ids.masked_fill(is_img, 0))  # (B, T, C); image slots are overwritten below
        if n_img == 0 and image_features:
            text = text + 0.0 * sum(f.sum() for f in image_features).to(text.dtype)
        if n_img == 0:
            position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
            return text, attention_mask, position_ids, labels

        image_feats = image_features or self.encode_images(pixel_values, image_sizes)  # [(n_k, C)] in reading order
        counts = torch.tensor([len(f) for f in image_feats], device=input_ids.device)  # (N,)
        # Where each input token lands: image k takes counts[k] slots, a text token one.
        width = torch.ones_like(input_ids)
        width[is_img] = counts  # (B, T); is_img's True entries in row-major order = reading order
        start = width.cumsum(1) - width  # (B, T) first slot of each token
        lengths = width.sum(1)  # (B,)
        L = int(lengths.max())
        left_padded = bool((~attention_mask[:, 0]).any())
        shift = (L - lengths) if left_padded else torch.zeros_like(lengths)  # (B,)
        start = start + shift[:, None]

        out = text.new_zeros(B, L, text.shape[-1])
        new_mask = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        tb, tt = (~is_img).nonzero(as_tuple=True)  # text tokens
        ib, it = is_img.nonzero(as_tuple=True)  # image tokens, in reading order = pixel_values order
        # every image embedding's row and slot: image k's j-th lands at (ib[k], start[ib[k], it[k]] + j)
        first = counts.cumsum(0) - counts  # (N,) index of each image's first embedding in the concatenation
        j = torch.arange(int(counts.sum()), device=input_ids.device) - first.repeat_interleave(counts)
        rows, slots = ib.repeat_interleave(counts), start[ib, it].repeat_interleave(counts) + j  # (sum n_k,)
        out[tb, start[tb, tt]] = text[tb, tt]
        out[rows, slots] = torch.cat(image_feats).to(text.dtype)
        new_mask[tb, start[tb, tt]] = attention_mask[tb, tt]
        new_mask[rows, slots] = attention_mask[ib, it].repeat_interleave(counts)
        position_ids = (new_mask.cumsum(1) - 1).clamp(min=0)  # (B, L): positions count image tokens
        new_labels = None
        if labels is not None:
            new_labels = torch.full((B, L), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            new_labels[tb, start[tb, tt]] = labels[tb, tt]  # image slots stay ignored
        return out, new_mask, position_ids, new_labels

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, labels=None, image_sizes=None,
                      image_features=None):
        embeds, mask, position_ids, labels = self.embed_inputs(input_ids, pixel_values, attention_mask, labels,
                                                               image_sizes, image_features)
        key_padding_mask = None if bool(mask.all()) else mask
        return self.language_model.model(embeds, position_ids, key_padding_mask), labels

    def forward(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None):
        """-> logits (B, L, V), L = T - n_img + n_img * Np for the longest sequence (AnyRes: each image its own)."""
        hidden, _ = self.hidden_states(input_ids, pixel_values, attention_mask, image_sizes=image_sizes)
        return self.language_model.lm_head(hidden)

    def loss(self, input_ids, labels, pixel_values=None, attention_mask=None, image_sizes=None, image_features=None):
        """Summed next-token cross-entropy over supervised tokens, and their count: (loss_sum, n_tokens).
        Returning the sum lets a training loop normalise by the tokens of the whole global batch."""
        hidden, labels = self.hidden_states(input_ids, pixel_values, attention_mask, labels, image_sizes,
                                            image_features)
        targets = labels[:, 1:]  # (B, L-1): position t predicts token t+1
        keep = targets != IGNORE_INDEX  # (B, L-1); image, prompt and padding positions carry no label
        # The head runs only where there is a label: most positions are image or prompt tokens (576 per image),
        # and a (B, L, V) logits tensor would dominate the step's time and memory.
        logits = self.language_model.lm_head(hidden[:, :-1][keep])  # (N, V), N supervised positions
        loss = cross_entropy(logits, targets[keep], IGNORE_INDEX, reduction="sum")
        return loss, logits.shape[0]
