"""minillava: LLaVA (v1 and 1.5) from scratch in plain PyTorch.

    import minillava
    model = minillava.load(path, vision_path=None, dtype=torch.float32, device="cpu")  # any official layout
    tok = minillava.Tokenizer(path)                                 # its tokenizer.model + tokenizer_config.json
    prompt = minillava.build_prompt([("human", "<image>\nWhat is this?")], "vicuna_v1")
    input_ids = torch.tensor([minillava.tokenize_with_images(prompt, tok, model.config.image_token_id)])
    pixels = minillava.preprocess_image("photo.jpg", size=model.config.vision.image_size)  # (3, S, S)
    logits = model(input_ids, pixel_values=pixels[None])  # ONE image_token_id per image in input_ids
"""
from minillava.config import LlavaConfig, TextConfig, VisionConfig, from_hf_config, get_preset, to_hf_config
from minillava.llava import Llava
from minillava.templates import build_prompt
from minillava.tokenizer import Tokenizer, tokenize_with_images


def load(path, vision_path=None, projector_path=None, dtype=None, device="cpu", **kwargs) -> Llava:
    """Load an official checkpoint in any layout (see weights/load.py); imported here lazily because the
    weights package itself builds minillava modules."""
    import torch
    from weights import load_llava
    return load_llava(path, vision_path=vision_path, projector_path=projector_path,
                      dtype=dtype or torch.float32, device=device, **kwargs)


def preprocess_image(image, size: int = 336, pad: bool = True):
    """An image (path, PIL image or HWC uint8 array) -> normalised (3, size, size) float32 tensor."""
    from minillava.image import preprocess_image as _preprocess
    return _preprocess(image, size=size, pad=pad)
