"""Which checkpoint layout each transformers version writes, and that minillava and it read each other's files.

The test suite checks the installed transformers only (tests/test_parity.py). This script checks any other
version, each in a virtualenv of its own (`pip install torch==2.13.0 transformers==X` + `pytest` is not needed):

    # in a venv with transformers X: save a model built from a config, with its logits
    python tests/transformers_versions.py hf-save /tmp/xv/hf-X
    # in minillava's venv: load every such dir strictly, print the layout picked and the logits' max error
    python tests/transformers_versions.py mini-load /tmp/xv/hf-*
    # the other way: minillava's save_llava output (layout A), read by transformers X
    python tests/transformers_versions.py mini-save /tmp/xv/mini          # minillava's venv
    python tests/transformers_versions.py hf-load /tmp/xv/mini            # each transformers venv

hf-save and hf-load import only torch and transformers (4.37 needs the old single-image-token input).
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_ID = 32


def hf_save(out):
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    v = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         image_size=28, patch_size=14, projection_dim=8)
    t = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=64)
    old = transformers.__version__ < "4.4"  # 4.37: no image_seq_length, one image token per image
    torch.manual_seed(0)
    m = LlavaForConditionalGeneration(LlavaConfig(vision_config=v, text_config=t, image_token_index=IMAGE_ID,
                                                  **({} if old else {"image_seq_length": 4}))).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    m.save_pretrained(out)
    pix = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 5] + [IMAGE_ID] * (1 if old else 4) + [7, 8, 9]])
    with torch.no_grad():
        logits = m(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids)).logits
    torch.save({"pix": pix, "logits": logits, "version": transformers.__version__}, os.path.join(out, "ref.pt"))
    print(f"transformers {transformers.__version__} saved {out}")


def mini_load(dirs):
    sys.path.insert(0, ROOT)
    from minillava.weights import keymaps, load_llava
    from minillava.weights.load import TensorFiles
    for d in dirs:
        ref = torch.load(os.path.join(d, "ref.pt"))
        model = load_llava(d)
        internal = set(model.state_dict())
        keys = TensorFiles(d).keys()
        layout = [n for n, r in keymaps.LLAVA_HF.items() if {keymaps.to_internal(k, r) for k in keys} == internal]
        with torch.no_grad():
            out = model(torch.tensor([[1, 5, IMAGE_ID, 7, 8, 9]]), ref["pix"])
        print(f"transformers {ref['version']}: layout {'/'.join(layout)}, minillava's logits max error "
              f"{(out - ref['logits']).abs().max().item():.2g}")


def mini_save(out):
    sys.path.insert(0, ROOT)
    from minillava.config import get_preset
    from minillava.weights import random_llava, save_llava
    cfg = get_preset("tiny")
    model = random_llava(cfg, seed=3)
    save_llava(model, out)
    pix = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, cfg.image_token_id, 7, 8, 9]]), pix)
    torch.save({"pix": pix, "logits": logits, "image_id": cfg.image_token_id, "np": cfg.num_image_tokens},
               os.path.join(out, "ref.pt"))
    print(f"minillava saved {out}")


def hf_load(d):
    import transformers
    from transformers import LlavaForConditionalGeneration
    ref = torch.load(os.path.join(d, "ref.pt"))
    model = LlavaForConditionalGeneration.from_pretrained(d).eval()
    n = 1 if transformers.__version__ < "4.4" else ref["np"]
    ids = torch.tensor([[1, 5] + [ref["image_id"]] * n + [7, 8, 9]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=ref["pix"], attention_mask=torch.ones_like(ids)).logits
    print(f"transformers {transformers.__version__} reads {d}: logits max error "
          f"{(logits - ref['logits']).abs().max().item():.2g}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"hf-save": lambda: hf_save(args[0]), "mini-load": lambda: mini_load(args),
     "mini-save": lambda: mini_save(args[0]), "hf-load": lambda: hf_load(args[0])}[cmd]()
